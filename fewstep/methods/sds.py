"""Score distillation sampling (SDS; Poole, Jain, Barron & Mildenhall, DreamFusion 2022), DESIGN §3.

SDS optimises the parameters θ of *any* differentiable representation x = g(θ) with the teacher's
denoising signal: noise the representation, ask the teacher which noise it sees, and move x along the
difference from the noise that was added,

    ∇_θ L = E_{σ,ε}[ w(σ)·(ε̂_φ(x_σ, σ) − ε) ]·∂x/∂θ,     x_σ = x + σ·ε

without differentiating the teacher. In σ-space ε̂ = (x_σ − D_φ(x_σ, σ))/σ, so ε̂ − ε = (x − D_φ(x_σ, σ))/σ:
with w(σ) = σ the per-element gradient is

    x − D_φ(x + σ·ε, σ)

(:func:`sds_loss`; ln σ log-normal as in EDM training, as Diff-Instruct draws it). It is Diff-Instruct's
gradient (f_ψ − f_φ) with the fake score's denoiser replaced by the representation itself: the denoiser of a
point mass at x is x. Diff-Instruct's (and ProlificDreamer's VSD's) fake score is what SDS lacks: SDS follows the
teacher's density uphill without the entropy term that keeps a distribution spread, so it is mode-seeking: for
a Gaussian teacher N(μ, s²I) its expected gradient is σ²/(s² + σ²)·(x − μ), and every x goes to μ; on a
mixture the samples bunch together where the noise-averaged density peaks (tests/test_sds.py).

:func:`sds_loss` takes any x that carries a gradient (pixels, particles, a renderer's output). The method
``sds`` applies it to a one-step generator x_g = G_θ(σ_init·z, σ_init), initialised from the teacher: the
fake-score family's student without a fake score (one generator forward-backward and one teacher
evaluation per iteration), so it sits beside Diff-Instruct as its ablation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import require
from ..diffusion.denoiser import append_dims, sample_edm_sigma
from ..model import FewstepModel, one_step_generate
from .base import (DataInfo, Method, Phase, check_guidance_classes, initial_network, register_method,
                   student_data_info)
from .fake_score import guided, keep_finite_rows, set_dropout


def sds_loss(x: torch.Tensor, teacher: nn.Module, labels=None, *, sigma: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, p_mean: float = -1.2, p_std: float = 1.2):
    """Per-sample SDS surrogate for a batch ``x`` (any tensor with a gradient), a pure function.

    Its gradient w.r.t. x is (x − D_φ(x + σε, σ)) per element, summed over dimensions per sample; the teacher is
    not differentiated. σ (ln σ ~ N(p_mean, p_std²)) and ε ~ N(0, I) are drawn unless given. Returns
    ``(per_sample_loss [N], info)`` with ``y_real`` = D_φ(x_σ, σ).
    """
    n = x.shape[0]
    if sigma is None:
        sigma = sample_edm_sigma(n, p_mean, p_std, device=x.device)
    if noise is None:
        noise = torch.randn_like(x)
    with torch.no_grad():
        x_t = x.detach() + append_dims(sigma, x.ndim) * noise
        y_real = teacher(x_t, sigma, labels).to(x.dtype)
    grad = x.detach() - y_real  # (ε̂ − ε)·σ: the fake score of a point mass at x is x itself
    return (grad * x).flatten(1).sum(1), {"sigma": sigma, "y_real": y_real, "x_t": x_t}


@dataclass
class SDSConfig:
    sigma_init: float = field(default=2.5, metadata={"help": "σ_init of the one-step generator x_g = G(σ_init·z, σ_init)"})
    lr: float = field(default=5e-5, metadata={"help": "generator learning rate (the fake-score family's default)"})
    betas: tuple[float, float] = field(default=(0.0, 0.999), metadata={"help": "Adam betas (the fake-score family's)"})
    loss_scale: float = field(default=100.0, metadata={"help": "the loss is summed and scaled by loss_scale/batch (as the fake-score family's)"})
    p_mean: float = field(default=-1.2, metadata={"help": "ln σ mean of the noise levels SDS reads the teacher at"})
    p_std: float = field(default=1.2, metadata={"help": "ln σ std"})
    guidance: float = field(default=1.0, metadata={"help": "classifier-free guidance scale κ of the teacher (class-conditional teachers; DreamFusion used large ones)"})
    dropout: float | None = field(default=None, metadata={"help": "dropout rate of the generator while it trains; unset keeps the teacher's"})

    def validate(self) -> None:
        require(self.sigma_init > 0 and math.isfinite(self.sigma_init), f"sigma_init must be > 0, got {self.sigma_init}")
        require(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        require(all(0 <= b < 1 for b in self.betas), f"betas must lie in [0, 1), got {self.betas}")
        require(self.loss_scale > 0, f"loss_scale must be > 0, got {self.loss_scale}")
        require(math.isfinite(self.guidance), f"guidance must be a number, got {self.guidance}")
        require(self.dropout is None or 0 <= self.dropout < 1,
                f"dropout must be in [0, 1) (or unset to keep the teacher's), got {self.dropout}")


@register_method
class SDS(Method):
    """Score distillation sampling (DreamFusion): a one-step generator moved along the teacher's (ε̂ − ε).

    Data-free, no fake score: Diff-Instruct without its fake network, so it seeks the teacher's modes instead of
    matching its distribution (the ablation beside Diff-Instruct / VSD). Its loss, :func:`sds_loss`, works on any
    differentiable representation from your own loop.
    """

    name = "sds"
    Config = SDSConfig
    uses_data = False
    summary = "score distillation sampling (DreamFusion): the teacher's (ε̂ − ε) signal, no fake score; mode-seeking"
    train_defaults = {"ema_halflife_kimg": 20.0, "ema_rampup": 0.5}

    def __init__(self, config: SDSConfig, teacher: nn.Module, generator: nn.Module, data_info: DataInfo):
        super().__init__(config)
        self.teacher = teacher
        self.G = generator.train().requires_grad_(True)
        self.nets = {"generator": self.G}
        self.frozen = {"teacher": teacher}
        self.ema_net = "generator"
        self.data_info = data_info

    @classmethod
    def create(cls, config: SDSConfig, *, teacher: FewstepModel, dataset=None, init: FewstepModel | None = None):
        """The generator starts from the teacher's weights (or ``init``'s, e.g. another one-step student)."""
        info = student_data_info(teacher, init)
        check_guidance_classes(config.guidance, teacher, info)
        G = initial_network(cls.name, teacher, init)
        if config.dropout is not None:
            set_dropout(G, config.dropout)
        return cls(config, teacher.denoiser, G, info)

    def build_optimizers(self):
        c = self.config
        return {"generator": torch.optim.Adam(self.G.parameters(), lr=c.lr, betas=tuple(c.betas))}

    def loss(self, batch):
        c, n, k = self.config, self.batch_size, self.data_info.num_classes
        labels = self.draw_labels(n)
        z = torch.randn((n,) + tuple(self.data_info.sample_shape), device=self.device)
        x_g = one_step_generate(self.G, z, c.sigma_init, labels)
        per, info = sds_loss(x_g, guided(self.teacher, c.guidance, k), labels, p_mean=c.p_mean, p_std=c.p_std)
        keep = keep_finite_rows(x_g, info["y_real"])
        return per[keep].sum() * (c.loss_scale / n), {"nan_samples/generator": int((~keep).sum())}

    def phases(self):
        return [Phase("generator", "generator", self.loss)]

    def export_config(self) -> dict:
        from ..model import network_spec

        return {"format": "fewstep.model", "version": 1, "type": "generator", **network_spec(self.G),
                "data": self.data_info.to_dict(),
                "sampling": {"sampler": "one-step", "sigma_init": self.config.sigma_init}}


__all__ = ["sds_loss", "SDSConfig", "SDS"]
