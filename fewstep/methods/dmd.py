"""Distribution Matching Distillation (DMD, Yin et al. 2024; DMD2), DESIGN §3.

grad = (f_ψ(x_t) − f_φ(x_t)) / mean|x_g − f_φ(x_t)|,  loss = ½‖x_g − sg(x_g − grad)‖²,
with several fake-score updates per generator update (DMD2: 5) and an optional
regression loss onto teacher ODE outputs for a fixed set of (noise, sample)
pairs (DMD; the paper uses LPIPS, fewstep uses L2 in model space).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import require
from ..diffusion.denoiser import append_dims
from .base import register_method
from .fake_score import FakeScoreConfig, FakeScoreMethod, denoise_both, generator_sigma, guided


def dmd_grad(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(f_ψ − f_φ) / mean over dims |x_g − f_φ|, per sample (no gradient)."""
    norm = (x_g - y_real).detach().abs().flatten(1).mean(1).clamp_min(eps)
    return ((y_fake - y_real) / append_dims(norm, x_g.ndim)).detach()


def dmd_loss(x_g: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """½‖x_g − sg(x_g − grad)‖² per element: its gradient w.r.t. x_g is ``grad``."""
    return 0.5 * (x_g - (x_g - grad).detach()) ** 2


def dmd_generator_loss(generator_out, teacher, fake, labels=None, *, sigma=None, noise=None,
                       t_min: float = 0.02, t_max: float = 980.0):
    """DMD distribution-matching loss of a batch x_g, a pure function; returns (per-sample [N], info)."""
    x_g = generator_out
    if sigma is None:
        sigma = generator_sigma(x_g.shape[0], t_min, t_max, device=x_g.device)
    if noise is None:
        noise = torch.randn_like(x_g)
    y_real, y_fake = denoise_both(x_g, teacher, fake, labels, sigma, noise, through_networks=False)
    loss = dmd_loss(x_g, dmd_grad(x_g, y_real, y_fake))
    return loss.flatten(1).sum(1), {"sigma": sigma, "y_real": y_real, "y_fake": y_fake}


def regression_loss(student_out: torch.Tensor, teacher_samples: torch.Tensor) -> torch.Tensor:
    """DMD's regression term: ‖G(σ_init·z) − ODE_teacher(σ_max·z)‖² per sample (L2)."""
    return (student_out - teacher_samples).pow(2).flatten(1).sum(1)


@dataclass
class DMDConfig(FakeScoreConfig):
    fake_updates: int = field(default=5, metadata={"help": "fake-score updates per generator update (DMD2: 5, DMD: 1)"})
    t_min: float = field(default=0.02, metadata={"help": "generator σ: t ~ U(t_min, t_max/1000) through the Karras ramp"})
    t_max: float = field(default=980.0, metadata={"help": "generator σ: upper end of t in thousandths"})
    regression_weight: float = field(default=0.0, metadata={"help": "weight of the regression loss on teacher pairs (DMD: 0.25; 0 = off)"})
    regression_pairs: int = field(default=1024, metadata={"help": "number of pre-generated (noise, teacher sample) pairs"})
    regression_steps: int = field(default=18, metadata={"help": "Heun steps of the teacher ODE for the pairs (18 = 35 NFE)"})

    def validate(self) -> None:
        super().validate()
        require(self.regression_weight >= 0, "regression_weight must be >= 0")
        require(self.regression_pairs >= 1, "regression_pairs must be >= 1")
        require(self.regression_steps >= 1, f"regression_steps must be >= 1 (Heun steps), got {self.regression_steps}")


@register_method
class DMD(FakeScoreMethod):
    """DMD/DMD2: normalised score-difference gradient with several fake-score updates per
    generator update; optional regression onto pre-generated teacher ODE pairs."""

    name = "dmd"
    Config = DMDConfig
    summary = "Distribution Matching Distillation (DMD2 defaults; --regression-weight for DMD)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def _make_pairs(self) -> None:
        """Teacher ODE outputs for a fixed set of noises (generated once; checkpointed), with the
        teacher under the guidance scale it has in the distribution-matching term, in full
        precision whatever the run's --precision (the pairs are fixed targets)."""
        from ..diffusion.denoiser import karras_sigmas
        from ..diffusion.samplers import heun

        c = self.config
        g = torch.Generator().manual_seed(12345)
        z = torch.randn((c.regression_pairs,) + tuple(self.data_info.sample_shape), generator=g)
        labels = self.draw_labels(c.regression_pairs)
        sig = karras_sigmas(c.regression_steps).to(self.device)
        teacher = guided(self.teacher, c.guidance_teacher, self.data_info.num_classes)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            x = heun(teacher, z.to(self.device) * sig[0], sig, labels).x
        self.pairs = (z.to(self.device), x, labels)

    def extra_state(self):
        if self.pairs is None:
            return {}, {}
        z, x, labels = self.pairs
        t = {"pairs.z": z, "pairs.x": x}
        if labels is not None:
            t["pairs.labels"] = labels
        return t, {}

    def load_extra_state(self, tensors, meta):
        if "pairs.z" in tensors:
            self.pairs = (tensors["pairs.z"].to(self.device), tensors["pairs.x"].to(self.device),
                          tensors["pairs.labels"].to(self.device) if "pairs.labels" in tensors else None)

    def per_sample_loss(self, x_g, teacher, fake, labels):
        return dmd_generator_loss(x_g, teacher, fake, labels, t_min=self.config.t_min, t_max=self.t_max_now)

    def generator_loss(self, batch):
        """The distribution-matching loss plus, when enabled, the regression term (DMD)."""
        c = self.config
        loss, stats = super().generator_loss(batch)
        if c.regression_weight > 0:
            if self.pairs is None:
                self._make_pairs()
            z, x_t, lab = self.pairs
            idx = torch.randint(0, z.shape[0], (self.batch_size,), device=z.device)
            from ..model import one_step_generate

            out = one_step_generate(self.G, z[idx], c.sigma_init, lab[idx] if lab is not None else None)
            reg = regression_loss(out, x_t[idx]).mean()
            loss = loss + c.regression_weight * reg * c.loss_scale
            stats["loss/regression"] = float(reg.detach())
        return loss, stats
