"""What a float16 model computes outside float16, and why.

Gemma's residual stream (the sum that runs between the decoder blocks) grows
past float16's largest value, 65504: the embedded Gemma 3 270M's reaches
about 104,000 by its 14th block, and a plain float16 run turns every logit
into NaN. A model whose compute dtype is float16 (`dtype="float16"` or
`"mixed_float16"`) therefore keeps that stream in float32: the token
embedding's output, each block's input and output, the post-attention and
post-FFW norms' outputs that are added to it, and the norms' inputs. The
weight products still take float16 inputs and weights. Two guards keep the
products themselves in range (see `FeedForward` and `Attention`): the FFN's
`gelu(gate) * up` is scaled down per token by a power of two before `down`
and scaled back in float32, and attention logits past float16's range are
clipped instead of becoming inf. bfloat16 and float32 models compute as
before: their residual dtype is their compute dtype.

>>> residual_dtype("float16"), residual_dtype("bfloat16")
('float32', 'bfloat16')
"""

FLOAT16_MAX = 65504.0


def residual_dtype(compute_dtype):
    """The dtype of the residual stream of a model that computes in `compute_dtype`:
    float32 for float16, which the stream outgrows; otherwise `compute_dtype`."""
    return "float32" if compute_dtype == "float16" else compute_dtype
