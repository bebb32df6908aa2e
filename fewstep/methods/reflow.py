"""Rectified flow by reflow (Liu et al. 2022, "Flow straight and fast"), DESIGN §3.

The teacher's ODE couples each noise z with a sample x_1. Reflow trains a flow on the straight lines
between the two ends of each pair,

    X_t = t·x_1 + (1 − t)·z,        loss = E_t ‖(x_1 − z) − v_θ(X_t, t)‖²,  t ~ U(t_0, t_1),

so that the new flow's trajectories are straighter than the teacher's and a few Euler steps (one, in
the limit of a perfect reflow) reproduce what the teacher's whole sampler makes. Repeating it on the
reflowed model's own pairs (``--teacher`` a reflow run, ``--steps N`` Euler steps of its ODE for the
pairs) straightens further (k-rectified flow); a one-step student then comes from knowledge
distillation on its pairs (``fewstep distill kd --teacher RUN --steps N``).

In fewstep's σ-space form (:mod:`fewstep.diffusion.conversions`) the flow is a denoiser D_θ at
σ = (1 − t)/t on x_σ = X_t / t, with v_θ = (D_θ − X_t)/(1 − t), so the loss is

    ‖(x_1 − z) − v_θ‖² = ‖D_θ(x_σ, σ) − x_1‖² · ((1 + σ)/σ)²,

a denoising loss on the pair's own line with the flow's velocity weighting; the student starts from
the teacher's network. Two choices that the σ-space form asks for, both exact in the paper's limit:

* the line's noise end. The teacher's sampler starts at the finite σ_0 = σ_max from x = σ_0·z
  (the paper's flow at t = 0 from z), so the line is the one through the sampler's actual start
  (t_0 = 1/(1 + σ_0), X = (1 − t_0)·z) and x_1: its t = 0 end is z̃ = z − x_1/σ_0. At σ_0 the
  student then sees exactly σ_0·z, the input its first sampling step gets, and the loss there is
  knowledge distillation's ‖D_θ(σ_0·z, σ_0) − x_1‖² times ((1 + σ_0)/σ_0)².
* the time range: t ~ U(t_0, t_1) between the sampling start and t_1 = 1/(1 + σ_min) (the
  reference's U(ε, 1) with ε = 1e-3; a σ-space network is not evaluated at σ = 0).

The exported model samples with Euler's method on rectified flow's uniform t grid (schedule
``flow``), NFE = steps; ``fewstep sample RUN --steps k`` picks k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import require
from ..diffusion.conversions import flow_sigma, flow_t, flow_velocity
from .base import check_sigma_range, register_method
from .kd import KDConfig, KnowledgeDistillation


# ---------------------------------------------------------------------------
# the loss (pure functions)
# ---------------------------------------------------------------------------

def straight_path(noise: torch.Tensor, x1: torch.Tensor, sigma_init: float, t: torch.Tensor):
    """The pair's straight line at times ``t`` ([N]): (x_σ, σ, z̃) with X_t = t·x_1 + (1 − t)·z̃, x_σ = X_t/t.

    z̃ = z − x_1/σ_0 is the line's t = 0 end through the sampler's start point σ_0·z at t_0 = 1/(1 + σ_0)."""
    z_end = noise - x1 / sigma_init
    sigma = flow_sigma(t)  # σ = (1 − t)/t
    x_sigma = x1 + sigma.view(-1, *[1] * (x1.ndim - 1)) * z_end  # X_t / t = x_1 + σ·z̃
    return x_sigma, sigma, z_end


def reflow_loss(student: nn.Module, noise: torch.Tensor, x1: torch.Tensor, sigma_init: float, t: torch.Tensor,
                labels=None, *, loss: str = "l2") -> torch.Tensor:
    """Per-sample ‖(x_1 − z̃) − v_θ(X_t, t)‖² (mean over dimensions) on the pair's straight line (a pure function).

    ``noise`` z and ``x1`` are a teacher pair (x_1 = ODE(σ_0·z)), ``t`` the flow times ([N], in (0, 1));
    ``loss="l1"`` takes |·| instead of the square."""
    x_sigma, sigma, z_end = straight_path(noise, x1, sigma_init, t)
    denoised = student(x_sigma, sigma, labels)
    denoised = denoised.to(torch.promote_types(denoised.dtype, x_sigma.dtype))  # bf16 autocast: in x's precision
    v = flow_velocity(denoised, x_sigma, sigma)  # v_θ = (D_θ − X_t)/(1 − t)
    d = v - (x1 - z_end)  # target: the line's velocity x_1 − z̃
    return (d.pow(2) if loss == "l2" else d.abs()).flatten(1).mean(1)


def sample_flow_times(n: int, sigma_init: float, sigma_min: float, device=None, generator=None) -> torch.Tensor:
    """t ~ U(t_0, t_1), t_0 = 1/(1 + σ_0) where sampling starts, t_1 = 1/(1 + σ_min)."""
    t0, t1 = float(flow_t(float(sigma_init))), float(flow_t(float(sigma_min)))
    u = torch.rand(n, device=device, generator=generator)
    return t0 + (t1 - t0) * u


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------

@dataclass
class ReflowConfig(KDConfig):
    loss: str = field(default="l2", metadata={"help": "velocity loss: l2 (the reference's) or l1"})
    lr: float = field(default=4e-4, metadata={"help": "Adam learning rate (on digits at batch 128 ahead of 1e-4, level with 1e-3: benchmarks/reflow.py)"})
    sigma_min: float = field(default=0.0, metadata={"help": "σ_min: flow times run up to t = 1/(1 + σ_min) (the reference's U(ε, 1)); 0 = the teacher's smallest σ (a diffusers UNet's table), else 0.002"})
    sample_steps: int = field(default=1, metadata={"help": "Euler steps of the exported model's own sampling recipe (any count can be asked for at sampling time)"})

    def validate(self) -> None:
        super().validate()
        require(0 <= self.sigma_min and math.isfinite(self.sigma_min),
                f"sigma_min must be a number >= 0 (0: the teacher's), got {self.sigma_min}")
        require(self.sample_steps >= 1, f"sample_steps must be >= 1, got {self.sample_steps}")


@register_method
class Reflow(KnowledgeDistillation):
    """Reflow (Liu et al. 2022): a straighter flow trained on the straight lines of teacher-ODE pairs.

    Generates (noise, teacher sample) pairs like `kd` (resumable, saved in the run folder), then trains
    the teacher's network as a rectified flow between each pair's ends. The result is a multi-step
    model sampled with Euler steps on the flow's time grid (`fewstep sample RUN --steps k`); run reflow
    on it again for a k-rectified flow, or `kd` on it for a one-step generator (both with --steps N: the
    pairs from N Euler steps of its ODE).
    """

    name = "reflow"
    Config = ReflowConfig
    summary = "rectified flow by reflow: a straighter flow on the straight lines of (noise, teacher-ODE sample) pairs"
    bench_steps = (2, 4)  # `fewstep bench` also scores the model at 2 and 4 Euler steps

    def __init__(self, config: ReflowConfig, teacher, student: nn.Module, data_info):
        super().__init__(config, teacher, student, data_info)
        lo = getattr(teacher.denoiser, "sigma_min", None)
        self.sigma_min = float(config.sigma_min or (lo if isinstance(lo, (int, float)) else 0.002))
        require(self.sigma_min < self.sigma_init,
                f"sigma_min ({self.sigma_min:g}) must be below the σ where sampling starts ({self.sigma_init:g})")
        check_sigma_range(teacher.denoiser, sigma_min=self.sigma_min, grid="flow's time range")
        # k of the k-rectified flow this run makes: a diffusion teacher (independent coupling) is the 1-rectified one
        prov = teacher.config.get("provenance", {})
        self.rectified = (int(prov.get("rectified", 1)) if prov.get("method") == self.name else 1) + 1

    def loss(self, batch):
        noise, x1, labels = self.pair_batch()
        t = sample_flow_times(self.batch_size, self.sigma_init, self.sigma_min, device=self.device)
        per = reflow_loss(self.student, noise, x1, self.sigma_init, t, labels, loss=self.config.loss)
        return per.mean(), {}

    def export_config(self) -> dict:
        from ..model import network_spec

        c = self.config
        return {"format": "fewstep.model", "version": 1, "type": "denoiser", **network_spec(self.student),
                "data": self.data_info.to_dict(),
                "sampling": {"sampler": "euler", "steps": int(c.sample_steps), "schedule": "flow",
                             "sigma_max": self.sigma_init},
                "provenance": {"method": self.name, "rectified": self.rectified, "sigma_min": self.sigma_min,
                               "pairs": {"n": c.n_pairs, "recipe": self.recipe}}}


__all__ = ["straight_path", "reflow_loss", "sample_flow_times", "ReflowConfig", "Reflow"]
