"""Diff-Instruct (Luo et al., 2023), DESIGN §3: the fake-score family without
gradients through the networks.

Generator gradient (f_ψ(x_t) − f_φ(x_t))·∂x_g/∂θ with x_t = x_g + σε and ln σ
log-normal as in EDM training; neither network is differentiated.
"""
from __future__ import annotations

import torch

from ..diffusion.denoiser import sample_edm_sigma
from .base import register_method
from .fake_score import FakeScoreMethod, denoise_both


def diff_instruct_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor,
                       weight: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-element surrogate whose gradient w.r.t. x_g is weight·(y_fake − y_real)."""
    return (weight * (y_fake - y_real)).detach() * x_g


def diff_instruct_generator_loss(generator_out, teacher, fake, labels=None, *, sigma=None, noise=None,
                                 p_mean: float = -1.2, p_std: float = 1.2):
    """Diff-Instruct loss of a batch x_g, a pure function; returns (per-sample loss [N], info)."""
    x_g = generator_out
    if sigma is None:
        sigma = sample_edm_sigma(x_g.shape[0], p_mean, p_std, device=x_g.device)
    if noise is None:
        noise = torch.randn_like(x_g)
    y_real, y_fake = denoise_both(x_g, teacher, fake, labels, sigma, noise, through_networks=False)
    loss = diff_instruct_loss(x_g, y_real, y_fake)
    return loss.flatten(1).sum(1), {"sigma": sigma, "y_real": y_real, "y_fake": y_fake}


@register_method
class DiffInstruct(FakeScoreMethod):
    """Diff-Instruct: SiD's fake-score machinery with the gradient (f_ψ − f_φ)·∂x_g/∂θ
    and no gradient through either network; σ log-normal as in EDM training."""

    name = "diff-instruct"
    summary = "Diff-Instruct (fake score, no gradient through the networks)"

    def per_sample_loss(self, x_g, teacher, fake, labels):
        return diff_instruct_generator_loss(x_g, teacher, fake, labels, p_mean=self.config.p_mean,
                                            p_std=self.config.p_std)
