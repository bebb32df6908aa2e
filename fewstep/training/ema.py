"""Exponential moving average with a half-life counted in images (EDM/SiD style)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(batch_images: int, halflife_kimg: float, cur_nimg: float = float("inf"),
             rampup_ratio: float | None = None) -> float:
    """β per step so the average has the given half-life in images seen.

    With ``rampup_ratio`` the half-life is capped at ``cur_nimg·ratio`` early on (EDM).
    """
    halflife_nimg = halflife_kimg * 1000.0
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    if halflife_nimg <= 0:
        return 0.0
    return 0.5 ** (batch_images / max(halflife_nimg, 1e-8))


@torch.no_grad()
def ema_step(average: nn.Module, net: nn.Module, beta: float) -> None:
    """average ← β·average + (1 − β)·net, parameter by parameter; buffers copied from ``net``."""
    for p_avg, p in zip(average.parameters(), net.parameters()):
        p_avg.lerp_(p.detach(), 1.0 - beta)
    for b_avg, b in zip(average.buffers(), net.buffers()):
        b_avg.copy_(b)


class EMA:
    """Keeps an EMA copy of a network (parameters averaged, buffers copied)."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)

    def update(self, beta: float) -> None:
        ema_step(self.ema, self.net, beta)
