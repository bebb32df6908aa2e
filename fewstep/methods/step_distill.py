"""Step distillation shared by progressive distillation and TRACT (DESIGN §3, seed 001).

The cosine logSNR schedule in fewstep's σ-space
-----------------------------------------------
Salimans & Ho use α_t = cos(πt/2), σ_t = sin(πt/2) and z_t = α_t·x + σ_t·ε. With
x_σ = x_0 + σ·ε this is σ_EDM = σ_t/α_t = tan(πt/2) and z_t = α_t·x_σ; the
signal-to-noise ratio is SNR = α_t²/σ_t² = 1/σ². t = 1 is σ = ∞, so fewstep
*clips the start*: the schedule's angle is scaled to end at t_max = (2/π)·atan(σ_max)
(σ_max = 80 by default, EDM's), i.e. an N-step student evaluates at

    σ_i = tan(π/2 · t_max · i/N),   i = N, …, 1,   then σ = 0

(TRACT's reference clips the same way, to logSNR ∈ [−20, 20]). That grid is exactly
``make_sigmas("cosine", N, sigma_min=σ_1, sigma_max=σ_max)``, so a student saved
with :func:`sampling_recipe` samples with ``fewstep sample`` at the very noise levels
it was trained on.

DDIM and the distillation target
--------------------------------
A deterministic DDIM step from σ to σ' with denoised estimate x̂ is
x' = x̂ + (σ'/σ)·(x − x̂) in σ-space, and z' = α'·x̂ + σ'_t·(z − α·x̂)/σ_t in z-space.
The x̃ that makes one student step from σ land exactly on a point x'' the teacher
reaches at σ'' is, in σ-space (r = σ''/σ),

    x̃ = (x'' − r·x) / (1 − r),

which is DESIGN's z-space formula x̃ = (z'' − (σ''_t/σ_t)·z)/(α'' − (σ''_t/σ_t)·α)
after z = α·x (multiply numerator and denominator by α''). At σ'' = 0 it is x''
itself, i.e. the teacher's last x̂.

Losses and parameterisations
----------------------------
The student regresses x̃ with weight w(λ): truncated SNR max(SNR, 1) or SNR + 1.
Student networks are EDM-preconditioned denoisers D; ``prediction`` chooses:

* ``"x"``: the loss is on x̂ = D;
* ``"v"``: the loss is on v̂ = α_t·ε̂ − σ_t·x̂ read out of D (ε̂ = (x − x̂)/σ).
  v − v̂ = −(x̃ − x̂)/σ_t, so ‖ṽ − v̂‖² = (SNR + 1)·‖x̃ − x̂‖²: v-MSE *is* the SNR+1
  weighting. (EDM's preconditioning with σ_data = 1 is exactly v-prediction, so the
  network itself already has a v-like output at every noise level.)
* ``"both"``: two output heads (x and ε) mixed by σ_t² and α_t²
  (:mod:`fewstep.nets.two_head`), both initialised from the teacher.

``weighting="auto"`` is SNR+1 for ``v`` (plain v-MSE) and truncated SNR otherwise.

Stages
------
A method holds a list of step counts, e.g. ``[256, 128, …, 1]`` (progressive) or
``[1024, 32, 1]`` (TRACT): stage k distils a teacher of ``schedule[k]`` steps into a
student of ``schedule[k+1]``. Stages are laid out by images seen inside the one
training loop (``begin_iteration``); at each boundary the stage's student is saved to
``RUN/stages/steps-<N>/`` (a model folder), becomes the frozen teacher of the next
stage, the student starts from it, and the optimiser is rebuilt. The learning rate
falls linearly to zero within a stage (S&H). Stage state is part of the training
checkpoint (``extra_state``), so a killed run resumes in the right stage.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import require
from ..diffusion.denoiser import EDMPrecond, append_dims
from ..diffusion.guidance import GuidanceInput, is_guidance_conditioned
from ..errors import FewstepError
from ..model import FewstepModel
from ..training.ema import ema_step
from .base import DataInfo, Method, Phase, check_sigma_range, initial_network
from .guidance import GuidanceConfig, sample_guidance

PREDICTIONS = ("x", "v", "both")
WEIGHTINGS = ("auto", "truncated-snr", "snr+1")


# ---------------------------------------------------------------------------
# the clipped cosine grid
# ---------------------------------------------------------------------------

def _t_of(sigma: float) -> float:
    return (2 / math.pi) * math.atan(sigma)


def sampling_recipe(steps: int, sigma_max: float = 80.0) -> dict:
    """The model-config ``sampling`` recipe of an ``steps``-step student (DDIM, clipped cosine grid)."""
    steps = int(steps)
    recipe = {"sampler": "ddim", "steps": steps, "schedule": "cosine", "sigma_max": float(sigma_max)}
    if steps > 1:
        recipe["sigma_min"] = float(math.tan(math.pi / 2 * _t_of(sigma_max) / steps))
    return recipe


@functools.lru_cache(maxsize=64)
def _grid(steps: int, sigma_max: float) -> torch.Tensor:
    from ..diffusion.samplers import make_sigmas

    r = sampling_recipe(steps, sigma_max)
    return make_sigmas("cosine", steps, sigma_min=r.get("sigma_min", 0.002), sigma_max=r["sigma_max"])


def step_sigmas(steps: int, sigma_max: float = 80.0, device=None) -> torch.Tensor:
    """σ of an ``steps``-step sampler: ``steps + 1`` decreasing values, σ_i = tan(π/2·t_max·i/N), last 0.

    Identical (float32) to what ``make_sigmas`` gives for :func:`sampling_recipe`.
    """
    if int(steps) != steps or steps < 1:
        raise FewstepError(f"step counts must be integers >= 1, got {steps!r}")
    return _grid(int(steps), float(sigma_max)).to(device)


# ---------------------------------------------------------------------------
# pure mathematics
# ---------------------------------------------------------------------------

def _b(v, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, device=x.device, dtype=x.dtype)
    return append_dims(v, x.ndim) if v.ndim == 1 else v


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Deterministic DDIM step in σ-space: x' = x̂ + (σ'/σ)·(x − x̂)."""
    return x0 + _b(sigma_next, x) / _b(sigma, x) * (x - x0)


def ddim_step_z(z: torch.Tensor, x0: torch.Tensor, alpha, sigma, alpha_next, sigma_next) -> torch.Tensor:
    """Deterministic DDIM step in z-space (VP units): z' = α'·x̂ + σ'·(z − α·x̂)/σ."""
    eps = (z - _b(alpha, z) * x0) / _b(sigma, z)
    return _b(alpha_next, z) * x0 + _b(sigma_next, z) * eps


def distill_target(x: torch.Tensor, x_next: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """σ-space x̃ = (x'' − (σ''/σ)·x)/(1 − σ''/σ): one DDIM step from (x, σ) with x̂ = x̃ lands on x''."""
    r = _b(sigma_next, x) / _b(sigma, x)
    return (x_next - r * x) / (1 - r)


def two_step_target(x0_first: torch.Tensor, x0_second: torch.Tensor, sigma, sigma_mid, sigma_next) -> torch.Tensor:
    """x̃ of two DDIM steps σ → σ' → σ'' written through the two denoised estimates x̂₁ (at σ), x̂₂ (at σ').

    Expanding the two steps, x'' − (σ''/σ)·x = (1 − σ''/σ')·x̂₂ + (σ''/σ')(1 − σ'/σ)·x̂₁, so

        x̃ = w₂·x̂₂ + w₁·x̂₁,   w₂ = (1 − σ''/σ')/(1 − σ''/σ),   w₁ = (σ''/σ')(1 − σ'/σ)/(1 − σ''/σ),

    with w₁ + w₂ = 1 (σ'' = 0: x̂₂; σ'' = σ': x̂₁). The same x̃ as :func:`distill_target` of the
    landing point, without its cancellation: (x'' − r·x)/(1 − r) divides by 1 − r ≈ 2π·t_max/N
    and so magnifies the teacher's rounding N-fold; here the weights are formed in float64 and
    the error stays at the teacher's own precision at any step count.
    """
    s, m, n = (_b(v, x0_first).double() for v in (sigma, sigma_mid, sigma_next))
    denom = 1 - n / s
    q = torch.where(m > 0, n / m, torch.ones_like(m))  # σ' = 0 only with σ'' = σ' = 0: an empty second step
    w2 = (1 - q) / denom
    w1 = q * (1 - m / s) / denom
    return (w2 * x0_second.double() + w1 * x0_first.double()).to(x0_first.dtype)


def distill_target_z(z: torch.Tensor, z_next: torch.Tensor, alpha, sigma, alpha_next, sigma_next) -> torch.Tensor:
    """DESIGN's z-space x̃ = (z'' − (σ''/σ)·z)/(α'' − (σ''/σ)·α)."""
    r = _b(sigma_next, z) / _b(sigma, z)
    return (z_next - r * z) / (_b(alpha_next, z) - r * _b(alpha, z))


def snr(sigma: torch.Tensor) -> torch.Tensor:
    """SNR = α_t²/σ_t² = 1/σ² for σ-space noise level σ."""
    return sigma.pow(-2)


def loss_weight(sigma: torch.Tensor, weighting: str = "truncated-snr") -> torch.Tensor:
    """w(λ) of S&H: ``"truncated-snr"`` max(SNR, 1), ``"snr+1"`` SNR + 1 (= v-MSE)."""
    s = snr(sigma)
    if weighting == "truncated-snr":
        return s.clamp(min=1.0)
    if weighting == "snr+1":
        return s + 1.0
    raise FewstepError(f"unknown weighting {weighting!r}; choose truncated-snr or snr+1")


def x0_to_v_sigma(x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """v = α_t·ε − σ_t·x̂ for x = x_σ at noise level σ (α_t = 1/√(1+σ²), σ_t = σ·α_t, ε = (x − x̂)/σ)."""
    s = _b(sigma, x)
    alpha = (1 + s**2).rsqrt()
    return alpha * (x - x0) / s - s * alpha * x0


def resolve_weighting(weighting: str, prediction: str) -> str:
    if weighting == "auto":
        return "snr+1" if prediction == "v" else "truncated-snr"
    return weighting


def step_distill_loss(x_hat: torch.Tensor, target: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, *,
                      weighting: str = "truncated-snr", prediction: str = "x") -> torch.Tensor:
    """Per-sample w(λ)·mean‖x̃ − x̂‖² (``prediction="v"``: computed as a v-space MSE, the same value).

    ``x`` is the noisy input at noise level ``sigma`` (needed for the v readout).
    """
    weighting = resolve_weighting(weighting, prediction)
    w = loss_weight(sigma, weighting)
    if prediction == "v":
        err = x0_to_v_sigma(x, x_hat, sigma) - x0_to_v_sigma(x, target, sigma)
        w = w / (snr(sigma) + 1.0)
    elif prediction in ("x", "both"):
        err = x_hat - target
    else:
        raise FewstepError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    return w * err.pow(2).flatten(1).mean(1)


@torch.no_grad()
def teacher_ddim(teacher: nn.Module, x: torch.Tensor, sigmas: list, labels=None) -> tuple[torch.Tensor, list]:
    """DDIM steps through per-sample noise levels ``sigmas = [σ_0, σ_1, …]`` (each ``[N]``).

    Returns the final x and the teacher's x̂ at each step.
    """
    x0s = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = teacher(x, s, labels).to(x.dtype)
        x0s.append(x0)
        x = ddim_step(x, x0, s, s_next)
    return x, x0s


# ---------------------------------------------------------------------------
# the shared method machinery
# ---------------------------------------------------------------------------

@dataclass
class StepDistillConfig:
    """Options shared by progressive distillation and TRACT."""

    sigma_max: float = field(default=80.0, metadata={"help": "σ at which sampling starts: the cosine schedule's t = 1 (σ = ∞) is clipped to t_max = (2/π)·atan(σ_max)"})
    prediction: str = field(default="x", metadata={"help": "student parameterisation: x, v (loss on v̂ read out of D) or both (x- and ε-heads mixed by σ_t², α_t²)"})
    weighting: str = field(default="auto", metadata={"help": "loss weight: truncated-snr max(SNR,1), snr+1 (= v-MSE), or auto (snr+1 for v, else truncated-snr)"})
    lr: float = field(default=5e-5, metadata={"help": "Adam learning rate at the start of each stage (reference: 5e-5)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    lr_anneal: bool = field(default=True, metadata={"help": "anneal the learning rate linearly to 0 within each stage"})
    kimg_per_stage: float = field(default=0.0, metadata={"help": "images per stage in kimg (0 = total_kimg split evenly over the stages)"})
    ema_residual: float = field(default=0.0, metadata={"help": "per-stage EMA of the student: the start-of-stage weights keep this share by the stage's end (0 = off; the EMA is exported and teaches the next stage)"})

    def validate(self) -> None:
        require(self.sigma_max > 0, f"sigma_max must be > 0, got {self.sigma_max}")
        require(self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        require(self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.kimg_per_stage >= 0, f"kimg_per_stage must be >= 0, got {self.kimg_per_stage}")
        require(0 <= self.ema_residual < 1, f"ema_residual must be in [0, 1), got {self.ema_residual}")


def _frozen_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).eval().requires_grad_(False)


class StepDistillMethod(Method):
    """Base of progressive distillation and TRACT: stages, their teachers, export (see module docstring).

    Subclasses set ``schedule`` (step counts, teacher first) in ``__init__`` and implement
    :meth:`stage_loss`.
    """

    Config = StepDistillConfig
    uses_data = True
    train_defaults = {"ema_halflife_kimg": 0.0, "grad_clip": 1.0}

    def __init__(self, config, teacher: nn.Module, student: nn.Module, data_info: DataInfo,
                 schedule: list[int]):
        super().__init__(config)
        if len(schedule) < 2:
            raise FewstepError(f"a step-distillation schedule needs a teacher and at least one student, got {schedule}")
        self.schedule = [int(s) for s in schedule]
        self.base_teacher = teacher
        self.teacher = teacher
        self.student = student.train().requires_grad_(True)
        self.nets = {"student": self.student}
        if config.ema_residual > 0:
            self.nets["student_ema"] = _frozen_copy(student)
            self.ema_net = "student_ema"
        else:
            self.ema_net = "student"
        self.frozen = {"teacher": teacher}
        self.data_info = data_info
        self.stage = 0
        self._saved: set[int] = set()
        self._total_nimg: int | None = None
        self.guidance_range: tuple[float, float] | None = None  # a guidance-distilled teacher's κ range
        self._kappa: torch.Tensor | None = None  # this iteration's κ per sample (guidance-distilled teachers)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def build(cls, config, teacher: FewstepModel, student: nn.Module, data_info: DataInfo, schedule: list[int]):
        """The method on ``teacher``; a guidance-distilled teacher (one that takes κ as an input,
        :mod:`fewstep.methods.guidance`) is distilled at every κ of the range it learnt."""
        method = cls(config, teacher.denoiser, student, data_info, schedule)
        if is_guidance_conditioned(teacher.denoiser):
            if data_info.num_classes <= 0:
                raise FewstepError("this teacher is guidance-distilled, but the student is unconditional "
                                   "(--init without classes): give it a guidance-distilled --init or none")
            if not is_guidance_conditioned(student):
                raise FewstepError("this teacher is guidance-distilled (it takes κ as an input), but --init has no "
                                   "guidance input: pass a guidance-distilled --init (a `fewstep distill guidance` "
                                   "run) or none (the student then starts as the teacher)")
            default = GuidanceConfig()  # a checkpoint without its range: guidance distillation's default one
            lo, hi = (teacher.config.get("provenance", {}).get("guidance_range")
                      or (default.guidance_min, default.guidance_max))
            method.guidance_range = (float(lo), float(hi))
        return method

    def guided(self, net: nn.Module) -> nn.Module:
        """``net`` at this iteration's guidance scales κ (a guidance-distilled teacher), else ``net`` itself."""
        return net if self._kappa is None else GuidanceInput(net, self._kappa)

    @classmethod
    def initial_student(cls, config, teacher: FewstepModel, init: FewstepModel | None) -> nn.Module:
        check_sigma_range(teacher.denoiser, sigma_max=config.sigma_max, grid="cosine grid")
        student = initial_network(cls.name, teacher, init)
        if config.prediction == "both":
            from ..nets.two_head import two_head_from

            if not isinstance(student, EDMPrecond):
                raise FewstepError("--prediction both adds a second output head to a fewstep UNet; this "
                                   f"teacher's network is a {type(student).__name__}: use --prediction x or v")
            student = EDMPrecond(two_head_from(student.net), student.sigma_data)
        return student

    # ---- stages -----------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.schedule) - 1

    @property
    def teacher_steps(self) -> int:
        return self.schedule[self.stage]

    @property
    def student_steps(self) -> int:
        return self.schedule[self.stage + 1]

    def stage_starts(self, total_nimg: int) -> list[int]:
        """Images seen at the start of each stage, plus the end of the last one."""
        s = self.num_stages
        per = self.config.kimg_per_stage * 1000 if self.config.kimg_per_stage > 0 else total_nimg / s
        starts = [int(round(k * per)) for k in range(s)]
        return starts + [max(int(total_nimg), starts[-1] + 1)]

    def stage_at(self, nimg: int, total_nimg: int) -> int:
        starts = self.stage_starts(total_nimg)
        k = 0
        while k + 1 < self.num_stages and nimg >= starts[k + 1]:
            k += 1
        return k

    def _run_dir(self) -> Path | None:
        from ..training import distributed as dist

        d = getattr(self, "run_dir", None)
        return Path(d) if d is not None and dist.rank() == 0 else None

    def save_stage(self, path: Path | None = None) -> Path | None:
        """Write the current stage's student to ``RUN/stages/steps-<N>/`` (or ``path``)."""
        from ..model import save_model

        if path is None:
            root = self._run_dir()
            if root is None:
                return None
            path = root / "stages" / f"steps-{self.student_steps}"
        cfg = self.export_config()
        cfg["provenance"] = {**cfg.get("provenance", {}), "method": self.name, "stage": self.stage,
                             "teacher_steps": self.teacher_steps, "student_steps": self.student_steps,
                             "schedule": list(self.schedule)}
        save_model(path, self.nets[self.ema_net], cfg)
        self._saved.add(self.stage)
        return path

    def advance_stage(self) -> None:
        """End the current stage: save its student, make it the teacher, restart the student from it."""
        if self.stage not in self._saved:
            self.save_stage()
        exported = self.nets[self.ema_net]
        self.teacher = _frozen_copy(exported).to(self.device)
        self.frozen["teacher"] = self.teacher
        if exported is not self.student:
            self.student.load_state_dict(exported.state_dict())
        self.stage += 1
        self.optimizers = self.build_optimizers()
        self.on_stage_start()
        self.log(f"stage {self.stage + 1} of {self.num_stages}: {self.teacher_steps} → {self.student_steps} steps "
                 f"(the {self.teacher_steps}-step student, saved in stages/steps-{self.teacher_steps}, teaches it)")

    def on_stage_start(self) -> None:
        """Hook for subclasses (e.g. TRACT resets its self-teacher)."""

    def check_training(self, train_config, world_size: int = 1) -> None:
        """Every stage gets at least one iteration, and the loop's EMA (which would average across
        stages: the next stage's teacher is the raw student) is off."""
        if train_config.ema_halflife_kimg > 0:
            raise FewstepError(
                f"{self.name} trains stage by stage, each student starting from the previous one, so the "
                f"loop's EMA (ema_halflife_kimg={train_config.ema_halflife_kimg:g}) would average students of "
                "different step counts; set it to 0 (--ema-halflife-kimg 0, the CLI default) and use "
                "--ema-residual for a per-stage EMA")
        total = int(round(train_config.total_kimg * 1000))
        per = self.images_per_iteration(train_config.batch_size) * world_size
        starts = self.stage_starts(total)
        s = self.num_stages
        per_stage = self.config.kimg_per_stage * 1000
        if 0 < per_stage < per:
            raise FewstepError(f"--kimg-per-stage {self.config.kimg_per_stage:g} is less than one iteration "
                               f"({per} images): raise it to at least {per / 1000:g}")
        for k in range(s):
            if starts[k + 1] - starts[k] < per:
                need = (s - 1) * per_stage + per if per_stage > 0 else s * per
                raise FewstepError(
                    f"{s} stages ({' → '.join(map(str, self.schedule))} steps) do not fit in "
                    f"total_kimg={train_config.total_kimg:g}: stage {k + 1} ({self.schedule[k]} → "
                    f"{self.schedule[k + 1]} steps) would get {max(starts[k + 1] - starts[k], 0)} images, fewer "
                    f"than one iteration's {per}, and its student would be a copy of its teacher; raise "
                    f"--total-kimg to at least {need / 1000:g}"
                    + (" or lower --kimg-per-stage" if per_stage > 0 else ""))

    def begin_iteration(self, nimg: int, total_nimg: int) -> None:
        self._total_nimg = int(total_nimg)
        target = self.stage_at(nimg, total_nimg)
        if self.stage > target:  # a resume whose stage layout (total / kimg per stage) changed
            starts = self.stage_starts(total_nimg)
            raise FewstepError(
                f"the training state is in stage {self.stage + 1} ({self.teacher_steps} → {self.student_steps} "
                f"steps), but at {nimg / 1000:g} kimg this run's stage layout (total {total_nimg / 1000:g} kimg, "
                f"stages starting at {', '.join(f'{a / 1000:g}' for a in starts[:-1])} kimg) is in stage "
                f"{target + 1}: resume with the --total-kimg and --kimg-per-stage the run started with")
        while self.stage < target:
            self.advance_stage()
        starts = self.stage_starts(total_nimg)
        lr = self.config.lr
        if self.config.lr_anneal:
            a, b = starts[self.stage], starts[self.stage + 1]
            lr *= max(0.0, 1.0 - (nimg - a) / max(b - a, 1))
        for g in self.optimizers["student"].param_groups:
            g["lr"] = lr

    def _images_per_iteration(self) -> int:
        from ..training import distributed as dist

        return self.images_per_iteration(self.batch_size) * dist.world_size()

    @torch.no_grad()
    def end_iteration(self, nimg: int) -> None:
        per = self._images_per_iteration()
        if self.config.ema_residual > 0 and self._total_nimg:
            starts = self.stage_starts(self._total_nimg)
            length = max(starts[self.stage + 1] - starts[self.stage], per)
            ema_step(self.nets["student_ema"], self.student, self.config.ema_residual ** (per / length))
        if self._total_nimg is not None and nimg + per >= self._total_nimg:
            self.save_stage()  # the last stage's student, at the end of training

    # ---- optimisation -------------------------------------------------------------------------
    def build_optimizers(self):
        c = self.config
        return {"student": torch.optim.Adam(self.student.parameters(), lr=c.lr, betas=tuple(c.betas))}

    def phases(self):
        return [Phase("student", "student", self.loss)]

    def stage_loss(self, x0: torch.Tensor, labels) -> tuple[torch.Tensor, dict]:  # pragma: no cover
        raise NotImplementedError

    def loss(self, batch):
        x0, labels = batch
        if self.data_info.num_classes == 0:
            labels = None
        if self.guidance_range is not None:  # κ ~ U[range] per sample, the same for teacher and student
            self._kappa = sample_guidance(x0.shape[0], *self.guidance_range, device=x0.device)
        per, stats = self.stage_loss(x0, labels)
        stats = {"stage": self.stage, "student_steps": self.student_steps, **stats}
        return per.mean(), stats

    # ---- checkpoints ----------------------------------------------------------------------------
    def extra_state(self):
        tensors = {}
        if self.stage > 0:
            tensors.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        return tensors, {"stage": self.stage, "saved_stages": sorted(self._saved), "schedule": self.schedule}

    def load_extra_state(self, tensors, meta):
        if not meta:
            return
        if meta.get("schedule") and list(meta["schedule"]) != self.schedule:
            raise FewstepError(f"the checkpoint was made with step schedule {meta['schedule']}, "
                               f"this run asks for {self.schedule}; use another --out")
        self.stage = int(meta.get("stage", 0))
        self._saved = set(meta.get("saved_stages", []))
        if self.stage > 0:
            teacher = _frozen_copy(self.nets[self.ema_net])
            teacher.load_state_dict({k[len("teacher."):]: v for k, v in tensors.items() if k.startswith("teacher.")})
            self.teacher = teacher.to(self.device)
            self.frozen["teacher"] = self.teacher
        self.on_stage_start_resumed()

    def on_stage_start_resumed(self) -> None:
        """Hook after a resume has restored the stage (subclass state comes back with ``nets``)."""

    # ---- the student ------------------------------------------------------------------------------
    def export_config(self) -> dict:
        from ..model import network_spec

        cfg = {"format": "fewstep.model", "version": 1, "type": "denoiser",
               **network_spec(self.nets[self.ema_net]), "data": self.data_info.to_dict(),
               "sampling": sampling_recipe(self.student_steps, self.config.sigma_max)}
        if self.guidance_range is not None:  # the κ range the student learnt, for the next distillation
            cfg["provenance"] = {"guidance_range": list(self.guidance_range)}
        return cfg


__all__ = [
    "PREDICTIONS", "WEIGHTINGS", "sampling_recipe", "step_sigmas", "ddim_step", "ddim_step_z",
    "distill_target", "two_step_target", "distill_target_z", "snr", "loss_weight", "x0_to_v_sigma", "resolve_weighting",
    "step_distill_loss", "teacher_ddim", "StepDistillConfig", "StepDistillMethod",
]
