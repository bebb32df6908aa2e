"""BOOT: data-free distillation with bootstrapping (Gu, Zhai, Zhang, Liu & Susskind 2023), DESIGN §3.

The student g_θ(ε, σ_p) predicts, from the noise ε alone, the *signal* of the teacher's
probability-flow ODE trajectory that starts at x(σ_max) = σ_max·ε, at any of its noise levels σ_p:

    y(σ) = x(σ) − σ·ε                                   (BOOT's y_t = (x_t − σ_t ε)/α_t, with α = 1)

(σ-space, DESIGN §1: x_σ = x_0 + σ·ε). Along the trajectory y starts at y(σ_max) = 0 and ends at the
sample, y(0) = x(0). With x = y + σ·ε the ODE dx/dσ = (x − D(x, σ))/σ becomes the *signal-ODE*

    dy/dσ = (y − D(y + σ·ε, σ))/σ                       (BOOT's dy/dt = −λ'_t·(f_φ(x_t, t) − y_t))

in which ε appears only inside the teacher's input. One Euler step of it from σ_n to σ_{n+1} is
one DDIM step of the teacher mapped into y:

    y_{n+1} = y_n + δ_n·(D(y_n + σ_n·ε, σ_n) − y_n),     δ_n = 1 − σ_{n+1}/σ_n

On the grid σ_0 = σ_max > … > σ_{N−1} = σ_min > σ_N = 0 (Karras, ρ = 7: the EDM sampler's), the
student is taught one step at a time from its own prediction one step earlier (bootstrapping; no
data, no stored teacher trajectories, no EMA target):

    n ~ U{0, …, N−1}
    ŷ_n = sg(g_θ(ε, σ_n))   for n > 0;   ŷ_0 = y(σ_max) = 0   (the boundary, exact)
    y*_{n+1} = teacher step from ŷ_n (Heun, the EDM sampler's 2nd order, Euler into σ = 0; or Euler)
    loss = w_n·‖g_θ(ε, σ_{n+1}) − y*_{n+1}‖² / δ_n²,      w_n = boundary_weight for n = 0, else 1

The 1/δ² normalisation is BOOT's: the step's difference divided by its size is the signal-ODE's
derivative. The n = 0 terms are the boundary loss at the highest noise level: their target is the
teacher's own first step from σ_max·ε. A student that reproduces the teacher's N-step trajectory
from every ε has zero loss, and then g_θ(ε, 0) is the teacher's N-step sample from σ_max·ε.

The student is the teacher's network with one more input, σ_p (``path_embedding``: a
zero-initialised embedding of ln(1 + σ_p/σ_d)), read at a fixed input noise level σ_init:
g_θ(ε, σ_p) = D_θ(σ_init·ε, σ_init; σ_p). Until trained it is SiD's initial generator at every σ_p.
σ_p = 0 when none is given, so the exported student is a one-step generator like SiD's:
x = G(σ_init·z, σ_init). Cost per iteration: one student forward (the target, no gradient), two
teacher evaluations (Heun; one with Euler) and one student forward-backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import require
from ..diffusion.denoiser import append_dims, karras_sigmas
from ..errors import FewstepError
from ..model import FewstepModel
from .base import (DataInfo, Method, Phase, check_guidance_classes, check_sigma_range, initial_network,
                   register_method, student_data_info, with_new_input)
from .cd import SOLVERS, teacher_ode_step
from .fake_score import eval_mode, guided


# ---------------------------------------------------------------------------
# pure mathematics
# ---------------------------------------------------------------------------

def boot_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                device=None) -> torch.Tensor:
    """The N + 1 path points σ_0 = σ_max > … > σ_{N−1} = σ_min > σ_N = 0 (the EDM sampler's Karras grid)."""
    if int(steps) != steps or steps < 1:
        raise FewstepError(f"steps must be an integer >= 1, got {steps!r}")
    return karras_sigmas(int(steps), sigma_min, sigma_max, rho, device=device, append_zero=True)


def boot_signal(student: nn.Module, noise: torch.Tensor, sigma_path, sigma_init: float, labels=None) -> torch.Tensor:
    """g_θ(ε, σ_p) = D_θ(σ_init·ε, σ_init; σ_p): the student's signal y(σ_p) of the path from σ_max·ε."""
    n = noise.shape[0]
    s0 = torch.full((n,), float(sigma_init), device=noise.device, dtype=noise.dtype)
    return student(sigma_init * noise, s0, labels, path=sigma_path)


def signal_step(teacher: nn.Module, y: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                sigma_next: torch.Tensor, labels=None, solver: str = "heun") -> torch.Tensor:
    """One teacher ODE step of the signal y from σ to σ' (per sample ``[N]``, σ > σ' >= 0) along the path of ``noise``.

    The step (:func:`fewstep.methods.cd.teacher_ode_step`) is taken on x = y + σ·ε and mapped back, y' = x' − σ'·ε.
    Euler: x' = x + (σ' − σ)·d, which in y is y + δ·(D − y) with δ = 1 − σ'/σ. Heun adds the EDM sampler's
    second-order correction where σ' > 0 (Euler into σ' = 0, as the sampler does). No gradient.
    """
    nd = y.ndim
    x = y + append_dims(sigma, nd) * noise
    return teacher_ode_step(teacher, x, sigma, sigma_next, labels, solver) - append_dims(sigma_next, nd) * noise


def boot_loss(student: nn.Module, teacher: nn.Module, noise: torch.Tensor, sigmas: torch.Tensor, labels=None, *,
              sigma_init: float = 2.5, solver: str = "heun", boundary_weight: float = 1.0,
              index: torch.Tensor | None = None):
    """Per-sample BOOT loss w_n·‖g_θ(ε, σ_{n+1}) − y*_{n+1}‖²/δ_n² (module docstring), a pure function.

    ``sigmas``: the grid of :func:`boot_sigmas`; ``index`` n ∈ {0..N−1} per sample (drawn uniformly unless
    given). The target's student pass runs without gradient and in eval mode (no dropout: the function that is
    sampled); only the prediction at σ_{n+1} is differentiated. Returns ``(per_sample_loss [B], info)``.
    """
    b = noise.shape[0]
    sigmas = sigmas.to(device=noise.device, dtype=noise.dtype)
    steps = sigmas.numel() - 1
    if index is None:
        index = torch.randint(0, steps, (b,), device=noise.device)
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    with torch.no_grad():
        y = torch.zeros_like(noise)  # ŷ_0 = y(σ_max) = 0: the boundary
        rows = (index > 0).nonzero().flatten()
        if rows.numel():
            with eval_mode(student):
                y_rows = boot_signal(student, noise[rows], sigma[rows], sigma_init,
                                     labels[rows] if labels is not None else None)
            y = y.index_copy(0, rows, y_rows.to(y.dtype))
        target = signal_step(teacher, y, noise, sigma, sigma_next, labels, solver)
    pred = boot_signal(student, noise, sigma_next, sigma_init, labels)
    delta = 1 - sigma_next / sigma
    weight = torch.where(index == 0, torch.full_like(delta, float(boundary_weight)), torch.ones_like(delta))
    per = weight * (pred.float() - target.float()).flatten(1).pow(2).sum(1) / delta.float() ** 2
    return per, {"pred": pred, "target": target, "index": index, "sigma_next": sigma_next}


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------

@dataclass
class BOOTConfig:
    steps: int = field(default=18, metadata={"help": "N, steps of the teacher path the student learns (the EDM sampler's Karras grid σ_max → σ_min → 0; Heun with 18 steps is the teacher's 35-NFE sampler)"})
    sigma_min: float = field(default=0.002, metadata={"help": "σ_min, the grid's last point before 0"})
    sigma_max: float = field(default=80.0, metadata={"help": "σ_max, where the path starts (x = σ_max·ε, signal 0)"})
    rho: float = field(default=7.0, metadata={"help": "ρ of the Karras grid"})
    solver: str = field(default="heun", metadata={"help": "the teacher's step between grid points: heun (2nd order, 2 teacher evaluations; BOOT recommends a higher-order step against the accumulation of errors) or euler (DDIM, 1)"})
    sigma_init: float = field(default=2.5, metadata={"help": "input noise level of the student: g(ε, σ_p) = D(σ_init·ε, σ_init; σ_p) (SiD's one-step generator until trained)"})
    boundary_weight: float = field(default=1.0, metadata={"help": "weight of the boundary terms (the first step from σ_max, whose start y = 0 is exact) against the bootstrapped ones"})
    guidance: float = field(default=1.0, metadata={"help": "classifier-free guidance scale κ of the teacher's steps (class-conditional teachers; 1 = none)"})
    lr: float = field(default=3e-4, metadata={"help": "Adam learning rate (3e-4 was ahead of 1e-4 in digits trials: benchmarks/boot.py)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})

    def validate(self) -> None:
        require(int(self.steps) == self.steps and self.steps >= 1, f"steps must be an integer >= 1, got {self.steps}")
        require(0 < self.sigma_min < self.sigma_max, f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        require(math.isfinite(self.sigma_max), f"sigma_max must be finite, got {self.sigma_max}")
        require(self.rho > 0, f"rho must be > 0, got {self.rho}")
        require(self.solver in SOLVERS, f"solver must be one of {SOLVERS}, got {self.solver!r}")
        require(self.sigma_init > 0 and math.isfinite(self.sigma_init), f"sigma_init must be > 0, got {self.sigma_init}")
        require(self.boundary_weight >= 0, f"boundary_weight must be >= 0, got {self.boundary_weight}")
        require(math.isfinite(self.guidance), f"guidance must be a number, got {self.guidance}")
        require(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        require(all(0 <= b < 1 for b in self.betas), f"betas must lie in [0, 1), got {self.betas}")


@register_method
class BOOT(Method):
    """BOOT (Gu et al. 2023): a data-free one-step generator taught the teacher's ODE path step by step.

    The student g(ε, σ_p) predicts the signal y = x − σ_p·ε of the teacher's sampling path from σ_max·ε at
    every grid point σ_p; each iteration draws a grid step n, takes one teacher step from the student's own
    prediction at σ_n (from the exact y = 0 at σ_max for n = 0) and pulls its prediction at σ_{n+1} there.
    No training data. The exported student samples in one step: x = g(z, 0).
    """

    name = "boot"
    Config = BOOTConfig
    uses_data = False
    summary = "BOOT: data-free one-step generator bootstrapped along the teacher's signal-ODE path (Gu et al. 2023)"

    def __init__(self, config: BOOTConfig, teacher: nn.Module, student: nn.Module, data_info: DataInfo):
        super().__init__(config)
        self.teacher = teacher
        self.student = student.train().requires_grad_(True)
        self.nets = {"student": self.student}
        self.frozen = {"teacher": teacher}
        self.ema_net = "student"
        self.data_info = data_info
        self.sigmas = boot_sigmas(config.steps, config.sigma_min, config.sigma_max, config.rho)

    @classmethod
    def create(cls, config: BOOTConfig, *, teacher: FewstepModel, dataset=None, init: FewstepModel | None = None):
        """The student is the teacher's network (or ``init``'s) with a zero-initialised path input."""
        check_sigma_range(teacher.denoiser, sigma_min=config.sigma_min, sigma_max=config.sigma_max)
        info = student_data_info(teacher, init)
        check_guidance_classes(config.guidance, teacher, info)
        if init is not None and init.is_generator and not getattr(init.denoiser, "path_embedding", False):
            raise FewstepError("--init is a one-step generator without a path input (not a BOOT student): BOOT's "
                               "student must predict the whole path; start it from a denoiser or a BOOT student")
        src = initial_network(cls.name, teacher, init)
        student = with_new_input(src, "path_embedding", "BOOT adds a path input (the noise level of the point of "
                                 "the teacher's path it predicts)", "a diffusers UNet has no such input): pass "
                                 "--init with a fewstep denoiser of the same data")
        return cls(config, teacher.denoiser, student, info)

    def build_optimizers(self):
        c = self.config
        return {"student": torch.optim.Adam(self.student.parameters(), lr=c.lr, betas=tuple(c.betas))}

    def loss(self, batch):
        c, n = self.config, self.batch_size
        noise = torch.randn((n,) + tuple(self.data_info.sample_shape), device=self.device)
        labels = self.draw_labels(n)
        teacher = guided(self.teacher, c.guidance, self.data_info.num_classes)
        per, info = boot_loss(self.student, teacher, noise, self.sigmas, labels, sigma_init=c.sigma_init,
                              solver=c.solver, boundary_weight=c.boundary_weight)
        boundary = info["index"] == 0
        stats = {}
        if boundary.any():
            stats["loss/boundary"] = float(per[boundary].detach().mean())
        if not boundary.all():
            stats["loss/bootstrap"] = float(per[~boundary].detach().mean())
        return per.mean(), stats

    def phases(self):
        return [Phase("student", "student", self.loss)]

    def export_config(self) -> dict:
        from ..model import network_spec

        c = self.config
        return {"format": "fewstep.model", "version": 1, "type": "generator", **network_spec(self.student),
                "data": self.data_info.to_dict(),
                "sampling": {"sampler": "one-step", "sigma_init": c.sigma_init},
                "provenance": {"boot": {"steps": c.steps, "solver": c.solver, "sigma_max": c.sigma_max,
                                        "guidance": c.guidance}}}


__all__ = ["SOLVERS", "boot_sigmas", "boot_signal", "signal_step", "boot_loss", "BOOTConfig", "BOOT"]
