"""Small layer helpers shared by the backbones."""
from __future__ import annotations

from torch import nn


def num_groups(ch: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """GroupNorm group count as in EDM (≤ 32 groups of ≥ 4 channels), reduced until it divides ``ch``."""
    g = max(1, min(max_groups, ch // min_channels_per_group))
    while ch % g:
        g -= 1
    return g


def group_norm(ch: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(ch), ch, eps=1e-6, affine=affine)
