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
from .diff_instruct import diff_instruct_generator_loss
from .fake_score import FakeScoreConfig, FakeScoreMethod, denoise_both, generator_draws, generator_sigma


def sid_weight(x_g: torch.Tensor, y_real: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ω = stopgrad(mean over dims |x_g − f_φ(x_t)|), clipped ≥ 1e-5, per sample, broadcastable."""
    w = (x_g - y_real).detach().abs().flatten(1).mean(1).clamp_min(eps)
    return append_dims(w, x_g.ndim)


def pooled_weight(weight: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample ω averaged over a window of ``k`` samples of the batch adjacent in σ order
    (centred on the sample, shifted inward at the ends of the σ range; itself included).

    In few dimensions the per-sample mean|x_g − f_φ| can come arbitrarily close to 0
    (in 2-D, 1/ω has an infinite variance); pooling over samples at about the same σ
    estimates the ω that a high-dimensional sample gets from its own mean. k = 1: unchanged.
    """
    n = weight.shape[0]
    k = min(k, n)
    if k <= 1:
        return weight
    w = weight.flatten()
    ok = torch.isfinite(w)  # a NaN sample (dropped later) must not poison its neighbours' ω
    order = torch.argsort(sigma)
    zero = w.new_zeros(1)
    total = torch.cat([zero, torch.cumsum(torch.where(ok, w, 0.0)[order], 0)])
    count = torch.cat([zero, torch.cumsum(ok[order].to(w.dtype), 0)])
    start = (torch.arange(n, device=w.device) - k // 2).clamp(0, n - k)
    pooled = torch.empty_like(w)
    pooled[order] = (total[start + k] - total[start]) / (count[start + k] - count[start]).clamp_min(1)
    pooled = torch.where(ok, pooled, w)
    return pooled.view_as(weight)


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
                       t_max: float = 800.0, t_min: float = 0.0, through_networks: bool = True,
                       omega_pool: int = 1):
    """SiD generator loss for a batch x_g = ``generator_out`` (DESIGN §3 step 2), a pure function.

    Returns ``(per_sample_loss [N], info)``: the per-element loss summed over dimensions.
    ``teacher``/``fake`` are σ-space denoisers. ``through_networks=False`` detaches the
    networks' inputs (the ablation that turns SiD into Diff-Instruct). ``omega_pool`` > 1
    replaces each sample's ω by :func:`pooled_weight` over that many σ-adjacent samples.
    """
    x_g = generator_out
    sigma, noise = generator_draws(x_g, sigma, noise, t_min, t_max)
    y_real, y_fake = denoise_both(x_g, teacher, fake, labels, sigma, noise, through_networks=through_networks)
    weight = pooled_weight(sid_weight(x_g, y_real), sigma, omega_pool)
    loss = sid_loss(x_g, y_real, y_fake, alpha, weight)
    return loss.flatten(1).sum(1), {"sigma": sigma, "y_real": y_real, "y_fake": y_fake}


DETACH_LOSSES = ("sid", "diff-instruct")  # the warm start's generator loss (--detach-loss)


@dataclass
class SiDConfig(FakeScoreConfig):
    alpha: float = field(default=1.2, metadata={"help": "α of the 'L2 − α·L1' generator loss (1.2; 1.0 on some sets)"})
    omega_pool: int = field(default=1, metadata={"help": "average ω over a window of k samples of the batch adjacent in σ (1 = per sample, the reference; helps in few dimensions)"})
    antithetic: bool = field(default=False, metadata={"help": "pair the generator batch: each x_g twice, with noise ε and −ε at one σ (unbiased; off = the reference)"})
    detach_kimg: float = field(default=0.0, metadata={"help": "warm start: for the first this many kimg the networks' inputs are detached (cheaper per iteration; see --detach-loss), then the full SiD gradient; 0 = SiD throughout (the reference)"})
    detach_loss: str = field(default="sid", metadata={"choices": DETACH_LOSSES, "help": "the generator loss of the --detach-kimg warm start: sid (SiD's loss with the networks' inputs detached: Diff-Instruct's direction under SiD's σ law and ω) or diff-instruct (Diff-Instruct's own loss: σ log-normal by --p-mean/--p-std, unit weight)"})

    def validate(self) -> None:
        super().validate()
        require(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")
        require(self.omega_pool >= 1, f"omega_pool must be >= 1 (1 = per-sample ω), got {self.omega_pool}")
        require(self.detach_kimg >= 0, f"detach_kimg must be >= 0 (0 = SiD throughout), got {self.detach_kimg}")
        require(self.detach_loss in DETACH_LOSSES,
                f"detach_loss must be one of {', '.join(DETACH_LOSSES)}, got {self.detach_loss!r}")


@register_method
class SiD(FakeScoreMethod):
    """Score identity Distillation: data-free one-step generator from a diffusion teacher.

    Each iteration: a fake-score update (EDM loss on generated samples), then a
    generator update with the SiD loss; gradients through teacher and fake inputs.
    """

    name = "sid"
    Config = SiDConfig
    summary = "Score identity Distillation (data-free, one step; the flagship)"

    def generator_step_inputs(self, batch=None):
        if not self.config.antithetic:
            return super().generator_step_inputs(batch)
        half = (self.batch_size + 1) // 2
        labels = self.draw_labels(half)
        x_g = self.generate(half, labels, grad=True)
        n = self.batch_size
        return x_g.repeat((2,) + (1,) * (x_g.ndim - 1))[:n], (labels.repeat(2)[:n] if labels is not None else None)

    def per_sample_loss(self, x_g, teacher, fake, labels):
        c = self.config
        if c.detach_loss == "diff-instruct" and not self.through_networks_now:
            return diff_instruct_generator_loss(x_g, teacher, fake, labels, p_mean=c.p_mean, p_std=c.p_std)
        sigma = noise = None
        if c.antithetic:  # rows i and i + half share x_g and σ; their noises are ε and −ε
            n, half = x_g.shape[0], (x_g.shape[0] + 1) // 2
            s = generator_sigma(half, c.t_min, self.t_max_now, device=x_g.device)
            e = torch.randn_like(x_g[:half])
            sigma, noise = s.repeat(2)[:n], torch.cat([e, -e])[:n]
        return sid_generator_loss(x_g, teacher, fake, labels, alpha=c.alpha, t_min=c.t_min, t_max=self.t_max_now,
                                  sigma=sigma, noise=noise, omega_pool=c.omega_pool,
                                  through_networks=self.through_networks_now)

    @property
    def through_networks_now(self) -> bool:
        """Whether this iteration's gradient goes through the networks' inputs (off during --detach-kimg)."""
        return self._kimg >= self.config.detach_kimg
