"""Progressive distillation (Salimans & Ho, ICLR 2022), DESIGN §3 and seed 001.

A student of N DDIM steps learns from a teacher of 2N: sample i ∈ {1..N},
t = i/N, t' = t − 0.5/N, t'' = t − 1/N (on the clipped cosine grid of
:mod:`fewstep.methods.step_distill`); noise the data to z_t; the teacher takes two
DDIM steps t → t' → t''; the student regresses the x̃ that makes its single DDIM
step t → t'' land exactly where the teacher's two steps landed,

    x̃ = (x'' − (σ''/σ)·x)/(1 − σ''/σ)      (σ-space; = (z'' − (σ''_t/σ_t)z)/(α'' − (σ''_t/σ_t)α))

with weight max(SNR, 1) or SNR + 1. Halve N stage by stage, each student becoming
the next teacher: e.g. ``--start-steps 256 --end-steps 1`` runs 8 stages
(256 → 128 → … → 1) and saves every stage's student to ``RUN/stages/steps-<N>/``.
Reference: Adam lr 5e-5 annealed linearly to 0 within each stage, no EMA,
gradient clipping at 1 (the defaults here).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import require
from ..diffusion.denoiser import append_dims
from .base import register_method, student_data_info
from .step_distill import (StepDistillConfig, StepDistillMethod, step_distill_loss, step_sigmas, teacher_ddim,
                           two_step_target)


def halving_schedule(start_steps: int, end_steps: int = 1) -> list[int]:
    """[start, start/2, …, end]: the step counts of progressive distillation's stages."""
    out = [int(start_steps)]
    while out[-1] > end_steps:
        out.append(out[-1] // 2)
    return out


@torch.no_grad()
def progressive_target(teacher: nn.Module, x: torch.Tensor, sigma: torch.Tensor, sigma_mid: torch.Tensor,
                       sigma_next: torch.Tensor, labels=None) -> torch.Tensor:
    """x̃ for a student step σ → σ'' from the teacher's two DDIM steps σ → σ' → σ'' (per-sample ``[N]`` σ's).

    Formed from the teacher's two x̂ (:func:`two_step_target`), so its rounding does not grow with
    the step count; at σ'' = 0 it equals the teacher's x̂ at σ' exactly.
    """
    _, (x0_first, x0_second) = teacher_ddim(teacher, x, [sigma, sigma_mid, sigma_next], labels)
    return two_step_target(x0_first, x0_second, sigma, sigma_mid, sigma_next)


def progressive_sigmas(student_steps: int, index: torch.Tensor, sigma_max: float = 80.0):
    """(σ, σ', σ'') for grid positions ``index`` ∈ {0..N−1} counted from the top (0: t = t_max).

    σ = σ_{i}, σ'' = σ_{i+1} on the N-step grid and σ' the point between them on the 2N-step grid.
    """
    s = step_sigmas(student_steps, sigma_max, device=index.device)
    s2 = step_sigmas(2 * student_steps, sigma_max, device=index.device)
    return s[index], s2[2 * index + 1], s[index + 1]


def progressive_loss(student: nn.Module, teacher: nn.Module, x0: torch.Tensor, student_steps: int, labels=None, *,
                     sigma_max: float = 80.0, weighting: str = "auto", prediction: str = "x",
                     index: torch.Tensor | None = None, noise: torch.Tensor | None = None):
    """Per-sample progressive-distillation loss of an N-step ``student`` against a 2N-step ``teacher``.

    A pure function: draws the step ``index`` (uniform over the N student steps) and the
    ``noise`` unless given. Returns ``(per_sample_loss [B], info)`` with the target, the
    student's x̂ and the noise levels in ``info``.
    """
    n = x0.shape[0]
    if index is None:
        index = torch.randint(0, student_steps, (n,), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    sigma, sigma_mid, sigma_next = progressive_sigmas(student_steps, index, sigma_max)
    sigma, sigma_mid, sigma_next = (s.to(x0.dtype) for s in (sigma, sigma_mid, sigma_next))
    x = x0 + append_dims(sigma, x0.ndim) * noise
    target = progressive_target(teacher, x, sigma, sigma_mid, sigma_next, labels)
    x_hat = student(x, sigma, labels)
    per = step_distill_loss(x_hat, target, x, sigma, weighting=weighting, prediction=prediction)
    return per, {"target": target, "x_hat": x_hat, "x": x, "sigma": sigma, "sigma_next": sigma_next}


@dataclass
class ProgressiveConfig(StepDistillConfig):
    start_steps: int = field(default=256, metadata={"help": "DDIM steps of the original teacher; the first stage's student takes half (S&H: up to 1024 or 8192)"})
    end_steps: int = field(default=1, metadata={"help": "steps of the last stage's student (halving from start_steps)"})

    def validate(self) -> None:
        super().validate()
        require(self.end_steps >= 1, f"end_steps must be >= 1, got {self.end_steps}")
        require(self.start_steps > self.end_steps, f"start_steps ({self.start_steps}) must exceed end_steps ({self.end_steps})")
        s = self.start_steps
        while s > self.end_steps:
            require(s % 2 == 0, f"start_steps must halve down to end_steps exactly; {s} is odd "
                                f"(e.g. --start-steps 256 --end-steps 1, or 96 → 3)")
            s //= 2
        require(s == self.end_steps, f"start_steps={self.start_steps} does not halve down to end_steps={self.end_steps}")


@register_method
class Progressive(StepDistillMethod):
    """Progressive distillation (Salimans & Ho 2022): halve the DDIM steps stage by stage.

    Each stage trains a student of N steps to match, in one DDIM step, two DDIM steps of
    its teacher (the previous stage's student; the original teacher at the start), on the
    cosine logSNR schedule. Every stage's student is saved to RUN/stages/steps-<N>/ and
    samples with `fewstep sample RUN/stages/steps-<N>`; RUN/model is the latest stage's.
    Stages split total_kimg evenly unless --kimg-per-stage is given.
    """

    name = "progressive"
    Config = ProgressiveConfig
    summary = "progressive distillation: halve the sampling steps stage by stage (S&H 2022)"

    @classmethod
    def create(cls, config, *, teacher, dataset=None, init=None):
        student = cls.initial_student(config, teacher, init)
        return cls.build(config, teacher, student, student_data_info(teacher, init),
                         halving_schedule(config.start_steps, config.end_steps))

    def stage_loss(self, x0, labels):
        c = self.config
        per, info = progressive_loss(self.guided(self.student), self.guided(self.teacher), x0, self.student_steps,
                                     labels, sigma_max=c.sigma_max, weighting=c.weighting, prediction=c.prediction)
        return per, {}


__all__ = ["halving_schedule", "progressive_target", "progressive_sigmas", "progressive_loss",
           "ProgressiveConfig", "Progressive"]
