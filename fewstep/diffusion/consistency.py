"""Consistency models' boundary-condition parameterisation (Song et al. 2023; DESIGN §3).

A consistency function maps any point x_σ of a probability-flow ODE trajectory to the
trajectory's end at σ_min. Its network is parameterised so that f(x, σ_min) = x holds
exactly:

    f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))
    c_skip  = σ_d² / ((σ − σ_min)² + σ_d²)
    c_out   = (σ − σ_min)·σ_d / √(σ² + σ_d²)
    c_in    = 1/√(σ² + σ_d²)

(the consistency-models reference's ``get_scalings_for_boundary_condition``). It is the
same backbone F, c_in and c_noise as EDM's denoiser D = c_skip^EDM·x + c_out^EDM·F with
c_out^EDM = σ·σ_d/√(σ² + σ_d²), so a student initialised from an EDM teacher starts from
the teacher's F. :class:`ConsistencyDenoiser` wraps *any* σ-space denoiser D and reads F
out of it: c_out/c_out^EDM = 1 − σ_min/σ, hence

    f(x, σ) = c_skip·x + (1 − σ_min/σ)·(D(x, σ) − c_skip^EDM·x),

which for an EDM denoiser is the formula above term by term, and for any other denoiser
(a diffusers UNet on its ᾱ table) is the same parameterisation around the F that D implies.
"""
from __future__ import annotations

import torch
from torch import nn

from .denoiser import SIGMA_DATA, append_dims, as_sigma, edm_scalings


def consistency_scalings(sigma: torch.Tensor, sigma_min: float = 0.002, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in) of the boundary-condition parameterisation: c_skip(σ_min) = 1, c_out(σ_min) = 0."""
    d2 = sigma_data**2
    c_skip = d2 / ((sigma - sigma_min) ** 2 + d2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + d2).sqrt()
    c_in = 1.0 / (sigma**2 + d2).sqrt()
    return c_skip, c_out, c_in


class ConsistencyDenoiser(nn.Module):
    """f(x, σ) = c_skip(σ)·x + c_out(σ)·F: a consistency model around the denoiser ``inner``.

    ``inner`` is any σ-space denoiser (an :class:`EDMPrecond` around a fewstep backbone, or a
    diffusers UNet adapter); its weights are the model's weights. ``boundary_sigma`` is σ_min,
    where f is the identity; the multistep consistency sampler re-noises relative to it.
    """

    def __init__(self, inner: nn.Module, sigma_min: float = 0.002, sigma_data: float = SIGMA_DATA):
        super().__init__()
        if not sigma_min > 0:
            raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
        self.inner = inner
        self.sigma_min = float(sigma_min)
        self.sigma_data = float(sigma_data)

    @property
    def boundary_sigma(self) -> float:
        return self.sigma_min

    @property
    def num_classes(self) -> int:
        return int(getattr(self.inner, "num_classes", 0) or 0)

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = as_sigma(sigma, x)
        c_skip, _, _ = consistency_scalings(sigma, self.sigma_min, self.sigma_data)
        c_skip_edm = edm_scalings(sigma, self.sigma_data)[0]
        ratio = 1 - self.sigma_min / sigma  # c_out / c_out^EDM
        d = self.inner(x, sigma, labels).to(x.dtype)
        nd = x.ndim
        return append_dims(c_skip, nd) * x + append_dims(ratio, nd) * (d - append_dims(c_skip_edm, nd) * x)


__all__ = ["consistency_scalings", "ConsistencyDenoiser"]
