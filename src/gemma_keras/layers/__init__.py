from gemma_keras.layers.attention import Attention, AttentionPlan, attention_mask
from gemma_keras.layers.decoder_block import DecoderBlock
from gemma_keras.layers.feed_forward import FeedForward
from gemma_keras.layers.rms_norm import RMSNorm
from gemma_keras.layers.rotary_embedding import apply_rotary_embedding, rotary_tables
from gemma_keras.layers.soft_cap import soft_cap
from gemma_keras.layers.token_embedding import TokenEmbedding

__all__ = [
    "Attention",
    "AttentionPlan",
    "DecoderBlock",
    "FeedForward",
    "RMSNorm",
    "TokenEmbedding",
    "apply_rotary_embedding",
    "attention_mask",
    "rotary_tables",
    "soft_cap",
]
