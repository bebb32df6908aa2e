"""Score identity Distillation (SiD; Zhou et al., ICML 2024), DESIGN §3 and seed 003.

The generator minimises a Fisher divergence between teacher and fake scores in
which an identity replaces the optimal fake score ψ* by the injected noise; in
denoiser form, per element (y_r = f_φ(x_t,σ), y_f = f_ψ(x_t,σ)):

    loss = (y_r − y_f) · ((y_r − x_g) − α·(y_r − y_f)) / ω,   ω = sg(mean|x_g − y_r|) ≥ 1e-5

Gradients reach x_g through the explicit x_g and through both networks' inputs
x_t = x_g + σε; stopping those two (``through_networks=False``) gives the
Diff-Instruct-style gradient — SiD's key ablation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import require
from ..diffusion.denoiser import append_dims
from .base import register_method
from .fake_score import FakeScoreConfig, FakeScoreMethod, denoise_both, generator_sigma


def sid_weight(x_g: torch.Tensor, y_real: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ω = stopgrad(mean over dims |x_g − f_φ(x_t)|), clipped ≥ 1e-5, per sample, broadcastable."""
    w = (x_g - y_real).detach().abs().flatten(1).mean(1).clamp_min(eps)
    return append_dims(w, x_g.ndim)


def sid_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float = 1.2,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element SiD generator loss (y_r − y_f)·((y_r − x_g) − α(y_r − y_f))/ω  ("L2 − α·L1").

    α = 0 leaves (y_r − y_f)·(y_r − x_g)/ω; α = 1 gives (y_r − y_f)·(y_f − x_g)/ω.
    """
    if weight is None:
        weight = sid_weight(x_g, y_real)
    d = y_real - y_fake
    return d * ((y_real - x_g) - alpha * d) / weight


def sid_generator_loss(generator_out: torch.Tensor, teacher, fake, labels=None, *, alpha: float = 1.2,
                       sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       t_max: float = 800.0, t_min: float = 0.0, through_networks: bool = True):
    """SiD generator loss for a batch x_g = ``generator_out`` (DESIGN §3 step 2), a pure function.

    Returns ``(per_sample_loss [N], info)``: the per-element loss summed over dimensions.
    ``teacher``/``fake`` are σ-space denoisers. ``through_networks=False`` detaches the
    networks' inputs (the ablation that turns SiD into Diff-Instruct).
    """
    x_g = generator_out
    n = x_g.shape[0]
    if sigma is None:
        sigma = generator_sigma(n, t_min, t_max, device=x_g.device)
    if noise is None:
        noise = torch.randn_like(x_g)
    y_real, y_fake = denoise_both(x_g, teacher, fake, labels, sigma, noise, through_networks=through_networks)
    loss = sid_loss(x_g, y_real, y_fake, alpha)
    return loss.flatten(1).sum(1), {"sigma": sigma, "y_real": y_real, "y_fake": y_fake}


@dataclass
class SiDConfig(FakeScoreConfig):
    alpha: float = field(default=1.2, metadata={"help": "α of the 'L2 − α·L1' generator loss (1.2; 1.0 on some sets)"})

    def validate(self) -> None:
        super().validate()
        require(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")


@register_method
class SiD(FakeScoreMethod):
    """Score identity Distillation: data-free one-step generator from a diffusion teacher.

    Each iteration: a fake-score update (EDM loss on generated samples), then a
    generator update with the SiD loss; gradients through teacher and fake inputs.
    """

    name = "sid"
    Config = SiDConfig
    summary = "Score identity Distillation (data-free, one step; the flagship)"

    def per_sample_loss(self, x_g, teacher, fake, labels):
        c = self.config
        return sid_generator_loss(x_g, teacher, fake, labels, alpha=c.alpha, t_min=c.t_min, t_max=c.t_max)
