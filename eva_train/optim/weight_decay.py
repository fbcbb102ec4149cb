"""Which parameters take weight decay: the one rule for pretraining (AdamW) and the eval protocols
(LARS / SGD / AdamW). Matrices decay; biases, norm weights (1-d) and the token/position tables do
not (BEiT/MAE/EVA convention)."""

from collections.abc import Sequence

NO_DECAY_SUFFIXES = ("cls_token", "pos_embed", "mask_token")  # also decoder_pos_embed, decoder mask token


def skips_weight_decay(name: str, shape: Sequence[int]) -> bool:
    """`shape`: the parameter's full shape (under ZeRO-3 its `ds_shape`; its own tensor is empty)."""
    return len(shape) <= 1 or name.endswith(NO_DECAY_SUFFIXES)
