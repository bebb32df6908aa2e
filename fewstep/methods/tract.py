"""TRACT: transitive closure time-distillation (Berthelot et al. 2023), DESIGN §3.

Like progressive distillation, but over *time intervals* instead of halvings: the
teacher's T-step grid is cut into S intervals and the student learns, from any
teacher-grid point inside an interval, the one DDIM step that lands on the
interval's lower boundary. The target is bootstrapped:

    x_t  → (teacher, one DDIM step on its own grid)            → x_t'
    x_t' → (self-teacher = EMA of the student, one DDIM step)  → x_b    (skipped if t' = t_b)
    x̃ = (x_b − (σ_b/σ)·x_t)/(1 − σ_b/σ)                        (the same x̃ as progressive)

A schedule such as ``1024, 32, 1`` runs two stages (1024 → 32 intervals, then the
32-step student teaches 32 → 1), far fewer than the ten halvings of progressive
distillation. Reference (apple/ml-tract): self-teacher EMA momentum 0.5 per step,
truncated-SNR weighting, Adam lr 2e-4 without decay, gradient clip 1, and an EMA of
the student (start-of-phase weights decayed to 1e-3 by the phase's end) that is
sampled and becomes the next phase's teacher — the defaults here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import require
from ..diffusion.denoiser import append_dims
from ..diffusion.guidance import rows_of
from ..training.ema import ema_step
from .base import register_method, student_data_info
from .step_distill import (StepDistillConfig, StepDistillMethod, ddim_step, step_distill_loss, step_sigmas,
                           two_step_target)


def tract_indices(teacher_steps: int, student_steps: int, j: torch.Tensor):
    """For teacher-grid points t = j/T (``j`` ∈ {1..T}, counted from t = 0), the positions (from the top)
    of t and of the teacher's next point on the T-grid, of the interval's lower boundary on the S-grid,
    and whether the teacher's step already reaches that boundary."""
    m = teacher_steps // student_steps
    b = (j - 1) // m  # interval index from the bottom; its lower boundary is t = b·m/T
    return teacher_steps - j, teacher_steps - j + 1, student_steps - b, (j - 1) == b * m


@torch.no_grad()
def tract_target(teacher: nn.Module, self_teacher: nn.Module, x: torch.Tensor, sigma: torch.Tensor,
                 sigma_teacher: torch.Tensor, sigma_boundary: torch.Tensor, at_boundary: torch.Tensor,
                 labels=None) -> torch.Tensor:
    """TRACT's x̃: teacher step σ → σ_t', then (where ``~at_boundary``) a self-teacher step σ_t' → σ_b."""
    x0 = teacher(x, sigma, labels).to(x.dtype)
    x0_second = x0.clone()  # at the boundary the second step is empty and x̃ = the teacher's x̂
    inner = ~at_boundary
    if inner.any():
        lab = labels[inner] if labels is not None else None
        s1 = sigma_teacher[inner]
        x1i = ddim_step(x[inner], x0[inner], sigma[inner], s1)
        x0_second[inner] = rows_of(self_teacher, inner)(x1i, s1, lab).to(x.dtype)  # per-sample κ follow
    # x̃ = (x_b − (σ_b/σ)·x)/(1 − σ_b/σ), formed from the two x̂ without cancellation
    return two_step_target(x0, x0_second, sigma, sigma_teacher, sigma_boundary)


def tract_loss(student: nn.Module, teacher: nn.Module, self_teacher: nn.Module, x0: torch.Tensor,
               teacher_steps: int, student_steps: int, labels=None, *, sigma_max: float = 80.0,
               weighting: str = "auto", prediction: str = "x", j: torch.Tensor | None = None,
               noise: torch.Tensor | None = None):
    """Per-sample TRACT loss (a pure function); draws the teacher-grid point ``j`` ∈ {1..T} and noise unless given."""
    n = x0.shape[0]
    if teacher_steps % student_steps:
        raise ValueError(f"the teacher's {teacher_steps} steps must split evenly into {student_steps} intervals")
    if j is None:
        j = torch.randint(1, teacher_steps + 1, (n,), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    p, p_next, q, at_b = tract_indices(teacher_steps, student_steps, j)
    st = step_sigmas(teacher_steps, sigma_max, device=x0.device).to(x0.dtype)
    ss = step_sigmas(student_steps, sigma_max, device=x0.device).to(x0.dtype)
    sigma, sigma_teacher, sigma_b = st[p], st[p_next], ss[q]
    x = x0 + append_dims(sigma, x0.ndim) * noise
    target = tract_target(teacher, self_teacher, x, sigma, sigma_teacher, sigma_b, at_b, labels)
    x_hat = student(x, sigma, labels)
    per = step_distill_loss(x_hat, target, x, sigma, weighting=weighting, prediction=prediction)
    return per, {"target": target, "x_hat": x_hat, "x": x, "sigma": sigma, "bootstrapped": (~at_b).float().mean()}


@dataclass
class TRACTConfig(StepDistillConfig):
    intervals: list[int] = field(default_factory=lambda: [1024, 32, 1], metadata={"help": "step schedule: the original teacher's DDIM steps, then each phase's number of intervals (each dividing the one before), e.g. 1024,32,1"})
    self_teacher_decay: float = field(default=0.5, metadata={"help": "EMA momentum per iteration of the self-teacher (reference: 0.5)"})
    lr: float = field(default=2e-4, metadata={"help": "Adam learning rate (reference: 2e-4, constant)"})
    lr_anneal: bool = field(default=False, metadata={"help": "anneal the learning rate linearly to 0 within each phase"})
    ema_residual: float = field(default=1e-3, metadata={"help": "per-phase EMA of the student: start-of-phase weights keep this share by the phase's end (reference 1e-3; 0 = off); it is exported and teaches the next phase"})

    def validate(self) -> None:
        super().validate()
        s = [int(v) for v in self.intervals]
        require(len(s) >= 2, f"intervals needs the teacher's steps and at least one phase, got {s}")
        for a, b in zip(s[:-1], s[1:]):
            require(b >= 1 and b < a and a % b == 0,
                    f"each entry of intervals must be smaller than and divide the one before, got {s}")
        require(0 <= self.self_teacher_decay < 1, f"self_teacher_decay must be in [0, 1), got {self.self_teacher_decay}")


@register_method
class TRACT(StepDistillMethod):
    """TRACT (Berthelot et al. 2023): distil over time intervals with an EMA self-teacher.

    Phase k cuts the previous teacher's grid into intervals[k+1] intervals; the student
    learns to jump from any teacher-grid point to its interval's lower boundary, the
    part beyond the teacher's first step bootstrapped by an EMA of itself. Each phase's
    student is saved to RUN/stages/steps-<N>/; RUN/model is the latest.
    """

    name = "tract"
    Config = TRACTConfig
    summary = "TRACT: time-interval distillation with an EMA self-teacher (Berthelot et al. 2023)"

    def __init__(self, config, teacher, student, data_info, schedule):
        super().__init__(config, teacher, student, data_info, schedule)
        self.self_teacher = copy.deepcopy(student).eval().requires_grad_(False)
        self.nets["self_teacher"] = self.self_teacher  # checkpointed by the loop; never optimised

    @classmethod
    def create(cls, config, *, teacher, dataset=None, init=None):
        student = cls.initial_student(config, teacher, init)
        return cls.build(config, teacher, student, student_data_info(teacher, init), list(config.intervals))

    def on_stage_start(self) -> None:
        self.self_teacher.load_state_dict(self.student.state_dict())

    @torch.no_grad()
    def end_iteration(self, nimg: int) -> None:
        ema_step(self.self_teacher, self.student, self.config.self_teacher_decay)
        super().end_iteration(nimg)

    def stage_loss(self, x0, labels):
        c = self.config
        per, info = tract_loss(self.guided(self.student), self.guided(self.teacher), self.guided(self.self_teacher),
                               x0, self.teacher_steps, self.student_steps, labels, sigma_max=c.sigma_max,
                               weighting=c.weighting, prediction=c.prediction)
        return per, {"bootstrapped": float(info["bootstrapped"])}


__all__ = ["tract_indices", "tract_target", "tract_loss", "TRACTConfig", "TRACT"]
