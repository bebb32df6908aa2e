"""Consistency training (Song, Dhariwal, Chen & Sutskever 2023) and its improved recipe, iCT (Song & Dhariwal
2023), DESIGN §3.

Consistency distillation (:mod:`fewstep.methods.cd`) with the teacher's ODE step replaced by the data point:
both points of a pair lie on one noising path, the same x and z,

    x_n = x + σ_n·z,   x_{n+1} = x + σ_{n+1}·z                  (σ_n > σ_{n+1}: one step down the grid)
    loss = λ(σ_n, σ_{n+1})·d(f_θ(x_n, σ_n), f_θ⁻(x_{n+1}, σ_{n+1}))

Why this is a consistency loss: given x_n, E[x_{n+1} | x_n] = x_n + (σ_{n+1} − σ_n)·E[z | x_n]
= x_n + (σ_{n+1} − σ_n)·(x_n − D*(x_n, σ_n))/σ_n, one Euler step of the probability-flow ODE with the
data's *exact* denoiser D*(x, σ) = E[x_0 | x_σ = x]. So x_{n+1} is an unbiased one-sample estimate of what
CD's Euler step would give with an ideal teacher; what is left (the target is not linear in its input) shrinks
with the step, so the grid is refined during training: the N curriculum.

iCT, the default recipe (``k``, ``K`` in kimg here, in iterations in the papers):

    N(k) = min(s0·2^⌊k/K'⌋, s1) + 1,   K' = K/(log2⌊s1/s0⌋ + 1),   s0 = 10, s1 = 1280, K the whole run
                                              (fewstep's defaults: s1 = 320, K = 100 kimg; benchmarks/ct.py)
    n ~ p(n) ∝ erf((ln σ_n − P_mean)/(√2·P_std)) − erf((ln σ_{n+1} − P_mean)/(√2·P_std))
                                              (the log-normal mass of [σ_{n+1}, σ_n]; P_mean = −1.1, P_std = 2)
    λ = 1/(σ_n − σ_{n+1})
    d = pseudo-Huber √(‖·‖² + c²) − c, c = 0.00054·√dim
    θ⁻ = sg(θ)                                (μ = 0: no EMA target)

CT, the first recipe (LPIPS in the paper, whose weights no package ships):
``--curriculum sqrt --s0 2 --s1 150 --index uniform --weighting uniform --target-decay 0.9 --adaptive-decay
--distance l2``, i.e. N(k) = ⌈√(k/K·((s1 + 1)² − s0²) + s0²) − 1⌉ + 1 and μ(k) = exp(s0·ln μ0/(N(k) − 1))
(the reference's ``create_ema_and_scales_fn``, adaptive/progressive).

The student starts from the teacher's network under CD's boundary-condition scalings (consistency *tuning*:
Geng et al. 2024, ECT, found a pretrained diffusion model a far better start than a fresh network), or from a
fresh network of the teacher's architecture with ``--from-scratch`` (the papers' CT). The teacher's network is
never evaluated: CT needs data (``--data``, default the teacher's) and no teacher steps. Cost per iteration:
one forward-backward of the student and one forward of the target, no teacher evaluation (CD: two with Heun).
The target's pass re-draws the student's dropout masks, as in CD. The student exports and samples exactly as
CD's does: one step f(σ_max·z, σ_max), or k steps of the multistep consistency sampler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import require
from ..diffusion.consistency import ConsistencyDenoiser
from ..diffusion.denoiser import SIGMA_DATA, EDMPrecond, append_dims
from ..errors import FewstepError
from ..model import FewstepModel, build_from_config
from ..training.ema import ema_step
from .base import DataInfo, check_sigma_range, initial_network, register_method, student_data_info
from .cd import DISTANCES, ConsistencyDistillation, cd_sigmas, consistency_distance, random_state, rewind
from .fake_score import set_dropout

CURRICULA = ("doubling", "sqrt")
INDEX_LAWS = ("lognormal", "uniform")
WEIGHTINGS = ("inverse-gap", "uniform")


# ---------------------------------------------------------------------------
# pure mathematics
# ---------------------------------------------------------------------------

def ct_num_scales(kimg: float, curriculum_kimg: float, curriculum: str = "doubling", s0: int = 10,
                  s1: int = 1280) -> int:
    """N(k), the number of grid points after ``kimg`` of ``curriculum_kimg`` (K; past it N stays at its end).

    ``doubling`` (iCT): min(s0·2^⌊k/K'⌋, s1) + 1 with K' = K/(log2⌊s1/s0⌋ + 1).
    ``sqrt`` (CT): ⌈√(k/K·((s1 + 1)² − s0²) + s0²) − 1⌉ + 1, at least 2.
    """
    if curriculum not in CURRICULA:
        raise FewstepError(f"unknown curriculum {curriculum!r}; choose one of {CURRICULA}")
    if not (1 <= s0 <= s1):
        raise FewstepError(f"need 1 <= s0 <= s1, got s0={s0}, s1={s1}")
    k = min(max(float(kimg), 0.0), float(curriculum_kimg))
    if curriculum == "doubling":
        stage_kimg = curriculum_kimg / (math.log2(s1 // s0) + 1)
        return int(min(s0 * 2 ** math.floor(k / stage_kimg), s1)) + 1
    frac = k / curriculum_kimg
    scales = math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)
    return max(scales, 1) + 1


def ct_target_decay(num_scales: int, target_decay: float, s0: int, adaptive: bool) -> float:
    """μ of the target network at N = ``num_scales``: ``target_decay`` (iCT: 0), or with ``adaptive``
    CT's μ(k) = exp(s0·ln μ0/(N − 1)), μ0 = ``target_decay``."""
    if not adaptive or target_decay == 0:
        return float(target_decay)
    return math.exp(s0 * math.log(target_decay) / (num_scales - 1))


def ct_index_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's discretised log-normal over the N − 1 pairs (σ_n, σ_{n+1}) of the descending grid ``sigmas``:
    p(n) ∝ Φ(ln σ_n) − Φ(ln σ_{n+1}), Φ the CDF of N(P_mean, P_std²) (float64)."""
    ln = sigmas.double().log()
    cdf = torch.special.erf((ln - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[:-1] - cdf[1:]
    return mass / mass.sum()


def ct_weight(sigma: torch.Tensor, sigma_next: torch.Tensor, weighting: str = "inverse-gap") -> torch.Tensor:
    """λ per pair: iCT's 1/(σ_n − σ_{n+1}) (``inverse-gap``) or 1 (``uniform``, CT's)."""
    if weighting == "inverse-gap":
        return 1.0 / (sigma - sigma_next)
    if weighting == "uniform":
        return torch.ones_like(sigma)
    raise FewstepError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")


def consistency_training_loss(student: nn.Module, target: nn.Module, x0: torch.Tensor, sigmas: torch.Tensor,
                              labels=None, *, distance: str = "pseudo-huber", huber_c: float | None = None,
                              weighting: str = "inverse-gap", index_probs: torch.Tensor | None = None,
                              index: torch.Tensor | None = None, noise: torch.Tensor | None = None):
    """Per-sample CT loss λ·d(f_θ(x + σ_n·z, σ_n), f_θ⁻(x + σ_{n+1}·z, σ_{n+1})) (a pure function; no teacher).

    ``sigmas`` is a descending grid (:func:`fewstep.methods.cd.cd_sigmas`). The pair ``index`` ∈ {0..N−2} is
    drawn from ``index_probs`` (:func:`ct_index_probs`) or uniformly, and the ``noise`` z, unless given. The
    target's pass re-uses the student's dropout masks; gradients reach only ``student``. Returns
    ``(per_sample_loss [B], info)``.
    """
    n = x0.shape[0]
    sigmas = sigmas.to(device=x0.device, dtype=x0.dtype)
    if index is None:
        index = (torch.multinomial(index_probs.to(x0.device), n, replacement=True) if index_probs is not None
                 else torch.randint(0, sigmas.numel() - 1, (n,), device=x0.device))
    if noise is None:
        noise = torch.randn_like(x0)
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    x = x0 + append_dims(sigma, x0.ndim) * noise
    x_next = x0 + append_dims(sigma_next, x0.ndim) * noise  # the same path, one grid step lower
    state = random_state(x0.device)
    f = student(x, sigma, labels)
    rewind(state, x0.device)
    with torch.no_grad():
        f_target = target(x_next, sigma_next, labels).to(f.dtype)
    per = consistency_distance(f.float(), f_target.float(), distance, huber_c)
    per = per * ct_weight(sigma, sigma_next, weighting).float()
    return per, {"f": f, "f_target": f_target, "x": x, "x_next": x_next, "sigma": sigma, "sigma_next": sigma_next,
                 "index": index}


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------

@dataclass
class CTConfig:
    curriculum: str = field(default="doubling", metadata={"help": "how N grows: doubling (iCT: s0, 2·s0, … up to s1, in log2(s1/s0)+1 equal stages) or sqrt (CT)"})
    s0: int = field(default=10, metadata={"help": "N − 1 at the start (iCT: 10; CT: 2)"})
    s1: int = field(default=320, metadata={"help": "N − 1 at the end of the curriculum (iCT from scratch: 1280; CT: 150; from the teacher's weights on digits 320 was ahead of 1280 and 160, see benchmarks/ct.py)"})
    curriculum_kimg: float = field(default=100.0, metadata={"help": "K: kimg over which N grows from s0 + 1 to s1 + 1 (the papers: the whole run); 0 = the run's --total-kimg"})
    index: str = field(default="lognormal", metadata={"help": "law of the grid pair: lognormal (iCT's discretised log-normal) or uniform (CT)"})
    p_mean: float = field(default=-1.1, metadata={"help": "ln σ mean of the lognormal pair law (iCT: −1.1)"})
    p_std: float = field(default=2.0, metadata={"help": "ln σ std of the lognormal pair law (iCT: 2.0)"})
    weighting: str = field(default="inverse-gap", metadata={"help": "λ: inverse-gap 1/(σ_n − σ_{n+1}) (iCT) or uniform (CT)"})
    distance: str = field(default="pseudo-huber", metadata={"help": "d(·,·): pseudo-huber (iCT, c = 0.00054·√dim), l2 (mean squared) or l1"})
    huber_c: float = field(default=0.0, metadata={"help": "pseudo-Huber c (0 = 0.00054·√dim)"})
    target_decay: float = field(default=0.0, metadata={"help": "μ of the target network θ⁻ ← μθ⁻ + (1−μ)θ (iCT: 0, the target is the student; CT: μ0 = 0.9 with --adaptive-decay)"})
    adaptive_decay: bool = field(default=False, metadata={"help": "CT's μ(k) = exp(s0·ln μ0/(N(k) − 1)), μ0 = --target-decay"})
    sigma_min: float = field(default=0.002, metadata={"help": "σ_min, where the consistency model is the identity (the grid's last point)"})
    sigma_max: float = field(default=80.0, metadata={"help": "σ_max, the grid's first point and where one-step sampling starts"})
    rho: float = field(default=7.0, metadata={"help": "ρ of the Karras grid"})
    lr: float = field(default=4e-4, metadata={"help": "Adam learning rate"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    dropout: float | None = field(default=None, metadata={"help": "dropout rate of the student while it trains (iCT: 0.3 on CIFAR-10); unset keeps the teacher's"})
    from_scratch: bool = field(default=False, metadata={"help": "start from a fresh network of the teacher's architecture (the papers' CT) instead of the teacher's weights"})
    sample_steps: int = field(default=1, metadata={"help": "steps of the exported student's own sampling recipe (multistep consistency sampling; any count can be asked for at sampling time)"})

    def validate(self) -> None:
        require(self.curriculum in CURRICULA, f"curriculum must be one of {CURRICULA}, got {self.curriculum!r}")
        require(int(self.s0) == self.s0 and int(self.s1) == self.s1 and 1 <= self.s0 <= self.s1,
                f"need integers 1 <= s0 <= s1, got s0={self.s0}, s1={self.s1}")
        require(self.curriculum_kimg >= 0 and math.isfinite(self.curriculum_kimg),
                f"curriculum_kimg must be >= 0 (0 = the run's --total-kimg), got {self.curriculum_kimg}")
        require(self.index in INDEX_LAWS, f"index must be one of {INDEX_LAWS}, got {self.index!r}")
        require(self.p_std > 0, f"p_std must be > 0, got {self.p_std}")
        require(self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        require(self.distance in DISTANCES, f"distance must be one of {DISTANCES}, got {self.distance!r}")
        require(self.huber_c >= 0, f"huber_c must be >= 0, got {self.huber_c}")
        require(0 <= self.target_decay < 1, f"target_decay must be in [0, 1), got {self.target_decay}")
        require(not (self.adaptive_decay and self.target_decay == 0),
                "--adaptive-decay scales μ0 = --target-decay, which is 0: give --target-decay (CT: 0.9)")
        require(0 < self.sigma_min < self.sigma_max and math.isfinite(self.sigma_max),
                f"need 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")
        require(self.rho > 0, f"rho must be > 0, got {self.rho}")
        require(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        require(all(0 <= b < 1 for b in self.betas), f"betas must lie in [0, 1), got {self.betas}")
        require(self.dropout is None or 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        require(self.sample_steps >= 1, f"sample_steps must be >= 1, got {self.sample_steps}")


@register_method
class ConsistencyTraining(ConsistencyDistillation):
    """Consistency training, iCT's recipe by default (Song & Dhariwal 2023): a one- or few-step consistency
    model trained on data alone, both points of each pair on one noising path x + σ·z.

    Starts from the teacher's weights (consistency tuning) unless --from-scratch; no teacher is evaluated.
    The grid refines as training goes (the N curriculum, logged as num_scales). Needs training data (--data,
    default: the teacher's). Samples like CD's student (`fewstep sample RUN --steps k`).
    """

    name = "ct"
    Config = CTConfig
    uses_data = True
    summary = "consistency training (iCT): a consistency model trained on data alone, from the teacher's weights"

    def __init__(self, config: CTConfig, student: ConsistencyDenoiser, data_info: DataInfo):
        super().__init__(config, None, student, data_info)
        self.frozen = {}  # no teacher: only the data

    @classmethod
    def create(cls, config: CTConfig, *, teacher: FewstepModel, dataset=None, init: FewstepModel | None = None):
        """The student: the teacher's network (or ``init``'s, or with ``from_scratch`` a fresh one of its
        architecture) under consistency scalings."""
        check_sigma_range(teacher.denoiser, sigma_min=config.sigma_min, sigma_max=config.sigma_max)
        inner = initial_network(cls.name, teacher, init)
        if config.from_scratch:
            inner = build_from_config((init or teacher).config)
        if config.dropout is not None:
            set_dropout(inner, config.dropout)
        sigma_data = inner.sigma_data if isinstance(inner, EDMPrecond) else SIGMA_DATA
        return cls(config, ConsistencyDenoiser(inner, config.sigma_min, sigma_data), student_data_info(teacher, init))

    # ---- the curriculum ---------------------------------------------------------------------
    def set_grid(self, kimg: float, total_kimg: float) -> None:
        """N(kimg) over ``curriculum_kimg`` (0: the run's ``total_kimg``), its grid, pair law and target μ."""
        c = self.config
        n = ct_num_scales(kimg, c.curriculum_kimg or total_kimg or 1.0, c.curriculum, int(c.s0), int(c.s1))
        if getattr(self, "num_scales", None) != n:
            self.num_scales = n
            self.sigmas = cd_sigmas(n, c.sigma_min, c.sigma_max, c.rho)
            self.index_probs = ct_index_probs(self.sigmas, c.p_mean, c.p_std) if c.index == "lognormal" else None
        self.mu = ct_target_decay(n, c.target_decay, int(c.s0), c.adaptive_decay)

    def begin_iteration(self, nimg: int, total_nimg: int) -> None:
        self.set_grid(nimg / 1000.0, total_nimg / 1000.0)

    def consistency_loss(self, x0: torch.Tensor, labels):
        c = self.config
        per, _ = consistency_training_loss(self.student, self.target, x0, self.sigmas, labels, distance=c.distance,
                                           huber_c=c.huber_c, weighting=c.weighting, index_probs=self.index_probs)
        return per.mean(), {"num_scales": self.num_scales, "target_decay": self.mu}

    @torch.no_grad()
    def end_iteration(self, nimg: int) -> None:
        """θ⁻ ← μ·θ⁻ + (1 − μ)·θ with the curriculum's μ (iCT: μ = 0, θ⁻ = θ)."""
        ema_step(self.target, self.student, self.mu)

    def provenance(self) -> dict:
        c = self.config
        return {"method": self.name, "curriculum": c.curriculum, "s0": int(c.s0), "s1": int(c.s1),
                "distance": c.distance, "weighting": c.weighting, "from_scratch": bool(c.from_scratch)}


__all__ = ["CURRICULA", "INDEX_LAWS", "WEIGHTINGS", "ct_num_scales", "ct_target_decay", "ct_index_probs",
           "ct_weight", "consistency_training_loss", "CTConfig", "ConsistencyTraining"]
