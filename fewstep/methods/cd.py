"""Consistency distillation (Song, Dhariwal, Chen & Sutskever, ICML 2023), DESIGN §3.

A consistency model f_θ(x, σ) maps every point of a probability-flow ODE trajectory to the
trajectory's end at σ_min, with f_θ(x, σ_min) = x built into its parameterisation
(:mod:`fewstep.diffusion.consistency`). Distillation makes f_θ agree with itself across one
step of the *teacher's* ODE solver, as the reference (openai/consistency_models,
``consistency_losses``) does:

    σ_0 > σ_1 > … > σ_{N−1}: the N-point Karras grid from σ_max to σ_min (ρ = 7)
    n ~ U{0, …, N−2},  x_n = x + σ_n·z                       (x from the data)
    x̂_{n+1} = one Heun step of the teacher's ODE from σ_n to σ_{n+1}
    loss = λ·d(f_θ(x_n, σ_n), f_θ⁻(x̂_{n+1}, σ_{n+1})),   λ = 1

where θ⁻ is the *target network*, an EMA of θ updated after every step with
θ⁻ ← μ·θ⁻ + (1 − μ)·θ (μ = 0.95 for CD), and d is iCT's pseudo-Huber √(‖·‖² + c²) − c
with c = 0.00054·√d (the default), the squared L2 distance (the reference's ``l2``, a mean
over dimensions) or L1; the reference's LPIPS needs network weights no package ships. The target is evaluated with the dropout masks the online network drew
(the reference restores the RNG state before the target's pass). Student and target start
from the teacher's weights; the loop's EMA of the student (as the reference's EMA rates, but with a
half-life of kimg sized for short runs: 5 by default) is what is exported and sampled: one step f(σ_max·z, σ_max), or k steps of the multistep
consistency sampler (``fewstep sample RUN --steps k``).

Cost per iteration: one forward-backward of the student, one forward of the target and two
teacher evaluations (Heun).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import require
from ..diffusion.consistency import ConsistencyDenoiser
from ..diffusion.denoiser import SIGMA_DATA, EDMPrecond, append_dims, karras_sigmas
from ..diffusion.samplers import to_d
from ..errors import FewstepError
from ..model import FewstepModel
from ..training.ema import ema_step
from .base import DataInfo, Method, Phase, check_sigma_range, initial_network, register_method, student_data_info

SOLVERS = ("heun", "euler")
DISTANCES = ("l2", "l1", "pseudo-huber")


# ---------------------------------------------------------------------------
# pure mathematics
# ---------------------------------------------------------------------------

def cd_sigmas(num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
              device=None) -> torch.Tensor:
    """The N discretisation points σ_0 = σ_max > … > σ_{N−1} = σ_min (Karras grid, no trailing 0)."""
    if int(num_scales) != num_scales or num_scales < 2:
        raise FewstepError(f"num_scales must be an integer >= 2, got {num_scales!r}")
    return karras_sigmas(int(num_scales), sigma_min, sigma_max, rho, device=device, append_zero=False)


@torch.no_grad()
def teacher_ode_step(teacher: nn.Module, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                     labels=None, solver: str = "heun") -> torch.Tensor:
    """One step of the teacher's probability-flow ODE dx/dσ = (x − D(x, σ))/σ from σ to σ' (per-sample ``[N]``).

    Euler: x' = x + (σ' − σ)·d. Heun (EDM's Algorithm 1): x' = x + (σ' − σ)·(d + d')/2 with d' the
    derivative at the Euler point — the reference's ``heun_solver`` — on the rows with σ' > 0; rows going into
    σ' = 0 take the Euler step, as EDM's sampler does (CD's grid ends at σ_min; BOOT's ends at 0).
    """
    if solver not in SOLVERS:
        raise FewstepError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    h = append_dims(sigma_next - sigma, x.ndim)
    d = to_d(x, sigma, teacher(x, sigma, labels).to(x.dtype))
    x_next = x + h * d
    if solver == "euler":
        return x_next
    rows = (sigma_next > 0).nonzero().flatten()
    if rows.numel():
        xe, se = x_next[rows], sigma_next[rows]
        d2 = to_d(xe, se, teacher(xe, se, labels[rows] if labels is not None else None).to(x.dtype))
        x_next = x_next.index_copy(0, rows, x[rows] + h[rows] * (d[rows] + d2) / 2)
    return x_next


def random_state(device: torch.device):
    """The CPU (and CUDA) random streams' state, for :func:`rewind`: a consistency model's target pass re-draws
    the student pass's dropout masks, as the reference does by restoring the RNG state between the two."""
    if device.type not in ("cpu", "cuda"):
        raise FewstepError(f"consistency models share the student's dropout masks with the target by rewinding "
                           f"the CPU and CUDA random streams; they train on cpu or cuda, not {device.type}")
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def rewind(state, device: torch.device) -> None:
    """Set the random streams back to ``state`` (from :func:`random_state`)."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def pseudo_huber_c(sample_shape) -> float:
    """iCT's constant c = 0.00054·√d for data of ``d`` dimensions."""
    return 0.00054 * math.sqrt(math.prod(int(v) for v in sample_shape))


def consistency_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "l2", huber_c: float | None = None):
    """Per-sample d(a, b): ``l2`` mean squared difference, ``l1`` mean absolute difference,
    ``pseudo-huber`` √(‖a − b‖² + c²) − c (c: :func:`pseudo_huber_c` unless given)."""
    diff = (a - b).flatten(1)
    if distance == "l2":
        return diff.pow(2).mean(1)
    if distance == "l1":
        return diff.abs().mean(1)
    if distance == "pseudo-huber":
        c = pseudo_huber_c(a.shape[1:]) if not huber_c else float(huber_c)
        return (diff.pow(2).sum(1) + c * c).sqrt() - c
    raise FewstepError(f"unknown distance {distance!r}; choose one of {DISTANCES}")


def consistency_distillation_loss(student: nn.Module, target: nn.Module, teacher: nn.Module, x0: torch.Tensor,
                                  sigmas: torch.Tensor, labels=None, *, solver: str = "heun",
                                  distance: str = "l2", huber_c: float | None = None,
                                  index: torch.Tensor | None = None, noise: torch.Tensor | None = None):
    """Per-sample CD loss d(f_θ(x_n, σ_n), f_θ⁻(x̂_{n+1}, σ_{n+1})) (a pure function).

    ``sigmas`` is the descending grid of :func:`cd_sigmas`; the position ``index`` ∈ {0..N−2} and
    the ``noise`` are drawn unless given. The target's pass re-uses the student's dropout masks
    (the global RNG state is rewound to where the student's pass started). Gradients reach only
    ``student``. Returns ``(per_sample_loss [B], info)``.
    """
    n = x0.shape[0]
    sigmas = sigmas.to(device=x0.device, dtype=x0.dtype)
    if index is None:
        index = torch.randint(0, sigmas.numel() - 1, (n,), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    x = x0 + append_dims(sigma, x0.ndim) * noise
    state = random_state(x0.device)
    f = student(x, sigma, labels)
    x_next = teacher_ode_step(teacher, x, sigma, sigma_next, labels, solver)
    rewind(state, x0.device)
    with torch.no_grad():
        f_target = target(x_next, sigma_next, labels).to(f.dtype)
    per = consistency_distance(f.float(), f_target.float(), distance, huber_c)
    return per, {"f": f, "f_target": f_target, "x": x, "x_next": x_next, "sigma": sigma, "sigma_next": sigma_next}


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------

@dataclass
class CDConfig:
    num_scales: int = field(default=18, metadata={"help": "N, points of the Karras grid the teacher steps between (reference CIFAR-10 CD: 18)"})
    sigma_min: float = field(default=0.002, metadata={"help": "σ_min, where the consistency model is the identity (the grid's last point)"})
    sigma_max: float = field(default=80.0, metadata={"help": "σ_max, the grid's first point and where one-step sampling starts"})
    rho: float = field(default=7.0, metadata={"help": "ρ of the Karras grid"})
    solver: str = field(default="heun", metadata={"help": "the teacher's ODE step: heun (reference CD, 2 teacher evaluations) or euler (1)"})
    distance: str = field(default="pseudo-huber", metadata={"help": "d(·,·): pseudo-huber (iCT, c = 0.00054·√dim; ahead of l2 in digits trials), l2 (mean squared: the reference's option besides LPIPS, which needs weights no package ships) or l1"})
    huber_c: float = field(default=0.0, metadata={"help": "pseudo-Huber c (0 = 0.00054·√dim)"})
    target_decay: float = field(default=0.95, metadata={"help": "μ of the target network θ⁻ ← μθ⁻ + (1−μ)θ, per iteration (reference CD: 0.95)"})
    lr: float = field(default=4e-4, metadata={"help": "Adam learning rate (reference: 4e-4 at batch 512 on CIFAR-10; on digits at batch 128 it was ahead of 1e-4 and 1e-3)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    sample_steps: int = field(default=1, metadata={"help": "steps of the exported student's own sampling recipe (multistep consistency sampling; any count can be asked for at sampling time)"})

    def validate(self) -> None:
        require(int(self.num_scales) == self.num_scales and self.num_scales >= 2,
                f"num_scales must be an integer >= 2, got {self.num_scales}")
        require(0 < self.sigma_min < self.sigma_max, f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        require(math.isfinite(self.sigma_max), f"sigma_max must be finite, got {self.sigma_max}")
        require(self.rho > 0, f"rho must be > 0, got {self.rho}")
        require(self.solver in SOLVERS, f"solver must be one of {SOLVERS}, got {self.solver!r}")
        require(self.distance in DISTANCES, f"distance must be one of {DISTANCES}, got {self.distance!r}")
        require(self.huber_c >= 0, f"huber_c must be >= 0, got {self.huber_c}")
        require(0 <= self.target_decay < 1, f"target_decay must be in [0, 1), got {self.target_decay}")
        require(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        require(all(0 <= b < 1 for b in self.betas), f"betas must lie in [0, 1), got {self.betas}")
        require(self.sample_steps >= 1, f"sample_steps must be >= 1, got {self.sample_steps}")


@register_method
class ConsistencyDistillation(Method):
    """Consistency distillation (Song et al. 2023): a one- or few-step consistency model.

    The student f_θ is the teacher's network under the boundary-condition scalings (f(x, σ_min) = x);
    each iteration noises a data batch to a random grid point σ_n, takes one teacher ODE step to
    σ_{n+1} and pulls f_θ(x_n, σ_n) towards the target network's f_θ⁻ there. Needs training data
    (--data, default: the teacher's). The exported student samples in one step, or in k with the
    multistep consistency sampler (`fewstep sample RUN --steps k`).
    """

    name = "cd"
    Config = CDConfig
    uses_data = True
    summary = "consistency distillation: a consistency model trained across single teacher ODE steps (Song et al. 2023)"
    train_defaults = {"ema_halflife_kimg": 5.0}
    bench_steps = (2, 4)  # `fewstep bench` also scores the student with 2 and 4 steps of the multistep sampler

    def __init__(self, config: CDConfig, teacher: nn.Module, student: ConsistencyDenoiser, data_info: DataInfo):
        super().__init__(config)
        self.teacher = teacher
        self.student = student.train().requires_grad_(True)
        # the target network: never optimised, in train mode like the reference's (same dropout masks)
        self.target = copy.deepcopy(student).train().requires_grad_(False)
        self.nets = {"student": self.student, "target": self.target}
        self.frozen = {"teacher": teacher}
        self.ema_net = "student"
        self.data_info = data_info
        self.set_grid(0.0, 0.0)

    def set_grid(self, kimg: float, total_kimg: float) -> None:
        """``self.sigmas``, the grid at ``kimg`` of ``total_kimg``: CD's is fixed (CT's follows its curriculum)."""
        c = self.config
        self.sigmas = cd_sigmas(c.num_scales, c.sigma_min, c.sigma_max, c.rho)

    @classmethod
    def create(cls, config: CDConfig, *, teacher: FewstepModel, dataset=None, init: FewstepModel | None = None):
        """Student and target start from the teacher's network (or ``init``'s) under consistency scalings."""
        check_sigma_range(teacher.denoiser, sigma_min=config.sigma_min, sigma_max=config.sigma_max)
        inner = initial_network(cls.name, teacher, init)
        sigma_data = inner.sigma_data if isinstance(inner, EDMPrecond) else SIGMA_DATA
        student = ConsistencyDenoiser(inner, config.sigma_min, sigma_data)
        return cls(config, teacher.denoiser, student, student_data_info(teacher, init))

    def check_training(self, train_config, world_size: int = 1) -> None:
        if train_config.precision == "bf16" and self.config.distance == "pseudo-huber":
            self.log("warning: --precision bf16 with the pseudo-Huber distance: at large σ bf16 rounds f by more than "
                     "f differs from its target, and pseudo-Huber weighs every sample's direction alike, so the "
                     "gradient there is mostly rounding (cosine 0.41 to fp32's on the digits student; 0.98 with "
                     "--distance l2): prefer fp32, or --distance l2 under bf16", echo=True)

    def build_optimizers(self):
        c = self.config
        return {"student": torch.optim.Adam(self.student.parameters(), lr=c.lr, betas=tuple(c.betas))}

    def phases(self):
        return [Phase("student", "student", self.loss)]

    def loss(self, batch):
        x0, labels = batch
        return self.consistency_loss(x0, labels if self.data_info.num_classes else None)

    def consistency_loss(self, x0: torch.Tensor, labels):
        """The batch's loss and stats (CT overrides it with its own pair)."""
        c = self.config
        per, _ = consistency_distillation_loss(self.student, self.target, self.teacher, x0, self.sigmas, labels,
                                               solver=c.solver, distance=c.distance, huber_c=c.huber_c)
        return per.mean(), {}

    @torch.no_grad()
    def end_iteration(self, nimg: int) -> None:
        """θ⁻ ← μ·θ⁻ + (1 − μ)·θ (after the optimiser step)."""
        ema_step(self.target, self.student, self.config.target_decay)

    def export_config(self) -> dict:
        from ..model import network_spec

        c = self.config
        return {"format": "fewstep.model", "version": 1, "type": "denoiser", **network_spec(self.student),
                "data": self.data_info.to_dict(),
                "sampling": {"sampler": "consistency", "steps": int(c.sample_steps), "schedule": "consistency",
                             "sigma_min": float(c.sigma_min), "sigma_max": float(c.sigma_max), "rho": float(c.rho)},
                "provenance": self.provenance()}

    def provenance(self) -> dict:
        """What the exported config records of how the student was trained."""
        c = self.config
        return {"method": self.name, "num_scales": int(c.num_scales), "solver": c.solver, "distance": c.distance}


__all__ = ["SOLVERS", "DISTANCES", "cd_sigmas", "teacher_ode_step", "random_state", "rewind", "pseudo_huber_c", "consistency_distance",
           "consistency_distillation_loss", "CDConfig", "ConsistencyDistillation"]
