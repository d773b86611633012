from keras import ops


def soft_cap(x, cap):
    """`cap * tanh(x / cap)`: squashes logits smoothly into (-cap, cap). `cap=None` is a no-op."""
    if cap is None:
        return x
    return ops.tanh(x / cap) * cap
