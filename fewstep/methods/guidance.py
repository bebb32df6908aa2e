"""Guidance distillation (Meng et al., CVPR 2023, "On Distillation of Guided Diffusion Models"), DESIGN §3.

Classifier-free guidance costs two network passes per step, the labelled and the unlabelled one:

    D_κ(x, σ, c) = D(x, σ, ∅) + κ·(D(x, σ, c) − D(x, σ, ∅))          (κ = 1 + w of Meng et al.)

Stage one, this method: a student that also takes κ as an input learns D_κ in one pass, for every κ of
a range at once, on noised data x_σ = x_0 + σε, ln σ ~ N(P_mean, P_std²) (the teacher's training
distribution), κ ~ U[κ_min, κ_max], with EDM's weight λ(σ) (DESIGN §1):

    loss = λ(σ)·‖D_θ(x_σ, σ, c, κ) − sg(D_κ(x_σ, σ, c))‖²

The student is the teacher's network plus a guidance input (the embedding of w = κ − 1 through a
zero-initialised layer, added to the noise embedding: see :mod:`fewstep.nets.embedding`), so it starts as
the teacher's conditional denoiser. A share of the samples (``null_fraction``, like the teacher's label
dropout) carry the null label, whose target D(x, σ, ∅) does not depend on κ: the student keeps the
unconditional prediction. It samples with the teacher's recipe and ``--guidance κ`` at one evaluation
per step. Stage two is step distillation of that student: ``fewstep distill progressive --teacher RUN``
draws κ from the range the student learnt and passes it to teacher and student alike.

Data: the teacher's labelled training set (like teacher training); not data-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import require
from ..diffusion.denoiser import EDMPrecond, append_dims, edm_loss_weight, sample_edm_sigma
from ..diffusion.guidance import CFGDenoiser, is_guidance_conditioned
from ..errors import FewstepError
from .base import Method, Phase, initial_network, register_method, student_data_info, with_new_input


# ---- the mathematics: pure functions --------------------------------------------------------------------
@torch.no_grad()
def guided_target(teacher: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor,
                  scale, null_label: int | None = None) -> torch.Tensor:
    """The teacher's classifier-free-guided prediction D_κ(x, σ, c) at per-sample scales ``scale`` ``[N]``."""
    return CFGDenoiser(teacher, scale, null_label=null_label)(x, sigma, labels)


def sample_guidance(n: int, lo: float, hi: float, *, device=None, generator=None) -> torch.Tensor:
    """κ ~ U[lo, hi] per sample, ``[n]``."""
    return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)


def guidance_distillation_loss(student: nn.Module, teacher: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                               scale: torch.Tensor, *, sigma: torch.Tensor | None = None,
                               noise: torch.Tensor | None = None, p_mean: float = -1.2, p_std: float = 1.2,
                               sigma_data: float = 0.5, null_label: int | None = None):
    """Per-sample loss λ(σ)·‖D_θ(x_σ, σ, c, κ) − D_κ(x_σ, σ, c)‖² of a guidance-conditioned ``student``.

    A pure function: draws σ (EDM's log-normal) and the noise unless given. ``scale`` is κ per sample.
    Returns ``(per_sample_loss [N], info)`` with the target, the prediction, x_σ and σ in ``info``.
    """
    n = x0.shape[0]
    if sigma is None:
        sigma = sample_edm_sigma(n, p_mean, p_std, device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    sigma = sigma.to(x0.dtype)
    x = x0 + append_dims(sigma, x0.ndim) * noise
    target = guided_target(teacher, x, sigma, labels, scale, null_label)
    pred = student(x, sigma, labels, guidance=scale)
    per = edm_loss_weight(sigma, sigma_data) * (pred - target).pow(2).flatten(1).sum(1)
    return per, {"target": target, "pred": pred, "x": x, "sigma": sigma}


def guidance_student(denoiser: nn.Module) -> EDMPrecond:
    """A copy of a fewstep conditional denoiser with a guidance input added (zero-initialised: it predicts
    exactly what ``denoiser`` predicts for its labels, at every κ, until trained). A denoiser that already
    has one is copied as it is."""
    return with_new_input(denoiser, "guidance_embedding", "guidance distillation adds a guidance input",
                          "a diffusers UNet has no such input): distil a fewstep teacher, or pass --init with a "
                          "fewstep denoiser")


# ---- the method ----------------------------------------------------------------------------------------
@dataclass
class GuidanceConfig:
    guidance_min: float = field(default=1.0, metadata={"help": "smallest guidance scale κ the student learns (κ = 1 + w; 1 = no guidance)"})
    guidance_max: float = field(default=5.0, metadata={"help": "largest guidance scale κ the student learns (Meng et al.: w up to 4, κ = 5)"})
    null_fraction: float = field(default=0.1, metadata={"help": "share of samples trained with the null label (target: the unconditional prediction), so the student keeps it"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    p_mean: float = field(default=-1.2, metadata={"help": "mean of ln σ (EDM's training distribution)"})
    p_std: float = field(default=1.2, metadata={"help": "std of ln σ"})

    def validate(self) -> None:
        for k in ("guidance_min", "guidance_max", "lr", "p_mean", "p_std"):
            require(math.isfinite(getattr(self, k)), f"{k} must be a finite number, got {getattr(self, k)}")
        require(self.guidance_max >= self.guidance_min,
                f"guidance_max ({self.guidance_max}) must be >= guidance_min ({self.guidance_min})")
        require(0 <= self.null_fraction < 1, f"null_fraction must be in [0, 1), got {self.null_fraction}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.p_std > 0, f"p_std must be > 0, got {self.p_std}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"betas must be two Adam betas in [0, 1), got {list(self.betas)}")


@register_method
class GuidanceDistillation(Method):
    """Guidance distillation (Meng et al. 2023): one network pass learns classifier-free guidance.

    The student, the teacher's network with a guidance input, learns the teacher's guided prediction
    κ·D(x, c) + (1 − κ)·D(x, ∅) for every κ in [guidance_min, guidance_max]. Sample it with
    `fewstep sample RUN --guidance κ` (one evaluation per step instead of two); step-distil it with
    `fewstep distill progressive --teacher RUN`. Trains on the teacher's labelled data.
    """

    name = "guidance"
    Config = GuidanceConfig
    uses_data = True
    summary = "guidance distillation: classifier-free guidance in one network pass (Meng et al. 2023)"
    train_defaults = {"ema_halflife_kimg": 10.0}
    bench_default = False  # it halves the cost of a guided step, not the steps: name it in --methods to bench it

    def __init__(self, config: GuidanceConfig, teacher: nn.Module, student: nn.Module, data_info, recipe: dict):
        super().__init__(config)
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train().requires_grad_(True)
        self.nets = {"student": self.student}
        self.frozen = {"teacher": self.teacher}
        self.ema_net = "student"
        self.data_info = data_info
        self.recipe = dict(recipe)

    @classmethod
    def create(cls, config, *, teacher, dataset=None, init=None):
        k = teacher.data_info.num_classes
        if k <= 0:
            raise FewstepError("guidance distillation needs a class-conditional teacher trained with label dropout "
                               "(e.g. `fewstep teacher --data digits --conditional`); this one is unconditional")
        if is_guidance_conditioned(teacher.denoiser):
            raise FewstepError("this teacher is already guidance-distilled (it takes κ as an input); distil it "
                               "further with step distillation, e.g. `fewstep distill progressive --teacher ...`")
        if dataset is not None and dataset.labels is None:
            raise FewstepError("guidance distillation trains on labelled data, but this dataset has no labels: "
                               "pass the labelled dataset the teacher was trained on with --data")
        if init is not None and init.data_info.num_classes != k:  # one null label for teacher and student
            raise FewstepError(f"--init has {init.data_info.num_classes} classes but the teacher {k}: guidance "
                               "distillation trains the student's null label on the teacher's, so they need the "
                               "same classes")
        if teacher.sampling.get("sampler") == "one-step":
            raise FewstepError("the teacher is a one-step generator; guidance distillation needs a denoiser")
        student = guidance_student(initial_network(cls.name, teacher, init))
        return cls(config, teacher.denoiser, student, student_data_info(teacher, init), teacher.sampling)

    def build_optimizers(self):
        c = self.config
        return {"student": torch.optim.Adam(self.student.parameters(), lr=c.lr, betas=tuple(c.betas))}

    def loss(self, batch):
        c = self.config
        x0, labels = batch
        k = self.data_info.num_classes
        n = x0.shape[0]
        null = torch.rand(n, device=x0.device) < c.null_fraction
        labels = torch.where(null, torch.full_like(labels, k), labels.long())
        scale = sample_guidance(n, c.guidance_min, c.guidance_max, device=x0.device)
        per, info = guidance_distillation_loss(self.student, self.teacher, x0, labels, scale, p_mean=c.p_mean,
                                               p_std=c.p_std, sigma_data=self.student.sigma_data, null_label=k)
        return per.mean(), {}

    def phases(self):
        return [Phase("student", "student", self.loss)]

    def export_config(self) -> dict:
        from ..model import network_spec

        c = self.config
        return {"format": "fewstep.model", "version": 1, "type": "denoiser", **network_spec(self.student),
                "data": self.data_info.to_dict(), "sampling": dict(self.recipe),
                "provenance": {"method": self.name, "guidance_range": [c.guidance_min, c.guidance_max]}}


__all__ = ["guided_target", "sample_guidance", "guidance_distillation_loss", "guidance_student", "GuidanceConfig",
           "GuidanceDistillation"]
