"""Foreign parameterisations → σ-space denoisers (DESIGN §1).

fewstep speaks the variance-exploding form ``x_σ = x_0 + σ·ε``. Variance-
preserving (VP / DDPM) models instead see ``x_t = α_t·x_0 + σ_t·ε`` and predict
ε, v = α_t·ε − σ_t·x_0, or x_0 itself. The two forms describe the same
noisy variable up to a scale:

    σ_EDM = σ_t / α_t,      x_t = α_t · x_σ.

This module holds

* pure converters between ε, v and x̂_0 predictions (``eps_to_x0``, ``v_to_x0``,
  ``x0_to_eps``, ``x0_to_v``, ``eps_to_v``, ``v_to_eps``),
* the VP ↔ EDM scale relations (``vp_alpha_sigma``, ``alphas_cumprod_to_sigmas``),
* the cosine logSNR schedule of progressive distillation (``cosine_alpha_sigma``,
  ``cosine_sigma``, ``cosine_t``),
* rectified flow's time (``flow_t``, ``flow_sigma``) and velocity (``flow_velocity``),
* ``VPDenoiser`` for continuous-time VP models and ``DiscreteVPDenoiser`` for
  models trained on a discrete ``alphas_cumprod`` table (DDPM, diffusers).

The converters use the general forms (valid for any α, σ > 0, not only
α² + σ² = 1):  from x_t = α x_0 + σ ε and v = α ε − σ x_0,

    x_0 = (α x_t − σ v) / (α² + σ²),     ε = (σ x_t + α v) / (α² + σ²),

which reduce to DESIGN's x̂_0 = α x_t − σ v̂ on a VP schedule.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..errors import FewstepError
from .denoiser import append_dims, as_sigma

PREDICTIONS = ("epsilon", "v_prediction", "sample")


# ---------------------------------------------------------------------------
# Pure converters between ε, v and x̂_0 predictions
# ---------------------------------------------------------------------------

def _bc(v, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a float / ``[N]`` coefficient against ``x`` (``[N, ...]``)."""
    v = torch.as_tensor(v, device=x.device, dtype=x.dtype)
    return append_dims(v, x.ndim) if v.ndim == 1 else v


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x̂_0 = (x_t − σ_t ε̂) / α_t."""
    return (x_t - _bc(sigma, x_t) * eps) / _bc(alpha, x_t)


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """ε̂ = (x_t − α_t x̂_0) / σ_t."""
    return (x_t - _bc(alpha, x_t) * x0) / _bc(sigma, x_t)


def v_to_x0(x_t: torch.Tensor, v: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x̂_0 = (α_t x_t − σ_t v̂)/(α_t² + σ_t²)  (= α_t x_t − σ_t v̂ on a VP schedule)."""
    a, s = _bc(alpha, x_t), _bc(sigma, x_t)
    return (a * x_t - s * v) / (a**2 + s**2)


def v_to_eps(x_t: torch.Tensor, v: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """ε̂ = (σ_t x_t + α_t v̂)/(α_t² + σ_t²)."""
    a, s = _bc(alpha, x_t), _bc(sigma, x_t)
    return (s * x_t + a * v) / (a**2 + s**2)


def x0_to_v(x_t: torch.Tensor, x0: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """v = α_t ε − σ_t x_0 with ε implied by (x_t, x̂_0)."""
    return _bc(alpha, x_t) * x0_to_eps(x_t, x0, alpha, sigma) - _bc(sigma, x_t) * x0


def eps_to_v(x_t: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """v = α_t ε − σ_t x_0 with x_0 implied by (x_t, ε̂)."""
    return _bc(alpha, x_t) * eps - _bc(sigma, x_t) * eps_to_x0(x_t, eps, alpha, sigma)


def prediction_to_x0(out: torch.Tensor, x_t: torch.Tensor, alpha, sigma,
                     prediction: str) -> torch.Tensor:
    """Turn a raw VP network output of type ``prediction`` into x̂_0."""
    if prediction == "epsilon":
        return eps_to_x0(x_t, out, alpha, sigma)
    if prediction == "v_prediction":
        return v_to_x0(x_t, out, alpha, sigma)
    if prediction == "sample":
        return out
    raise FewstepError(f"unknown prediction type {prediction!r}; choose one of {list(PREDICTIONS)}")


def check_prediction(prediction: str) -> str:
    """Validate a prediction-type name (``epsilon`` / ``v_prediction`` / ``sample``)."""
    aliases = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "x_0": "sample"}
    prediction = aliases.get(prediction, prediction)
    if prediction not in PREDICTIONS:
        raise FewstepError(
            f"unsupported prediction type {prediction!r}; fewstep converts {list(PREDICTIONS)} "
            "(aliases: eps, v, x0)")
    return prediction


# ---------------------------------------------------------------------------
# VP ↔ EDM scale relations and schedules
# ---------------------------------------------------------------------------

def vp_alpha_sigma(sigma_edm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) of the VP process whose σ_EDM = σ_t/α_t: α = 1/√(1+σ²), σ_t = σ·α."""
    alpha = (1 + sigma_edm**2).rsqrt()
    return alpha, sigma_edm * alpha


def alphas_cumprod_to_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_EDM = √((1 − ᾱ)/ᾱ) for each entry of a DDPM ``alphas_cumprod`` table."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - a) / a).sqrt()


def lift_zero_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Replace ᾱ = 0 (σ = ∞, zero terminal SNR) by a tiny positive value.

    diffusers uses 2⁻²⁴; where that would exceed the previous (positive) entry and make σ
    non-monotone, half of that entry is used instead so σ still grows with t.
    """
    a = alphas_cumprod
    zero = a <= 0
    if not zero.any():
        return a
    floor = a[~zero].min() / 2 if (~zero).any() else torch.tensor(2.0**-24, dtype=a.dtype)
    return torch.where(zero, torch.clamp(floor, max=2.0**-24).to(a), a)


def linear_beta_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 1e-4,
                               beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ of DDPM's linear-β schedule (Ho et al. 2020; diffusers' ``beta_schedule='linear'``).

    Betas are built in float32 as diffusers does, so the table matches its schedulers bit-for-bit.
    """
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def cosine_alpha_sigma(t) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine logSNR schedule of progressive distillation: α_t = cos(πt/2), σ_t = sin(πt/2)."""
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.double()
    return torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)


def cosine_sigma(t) -> torch.Tensor:
    """σ_EDM(t) = σ_t/α_t = tan(πt/2) for the cosine schedule (t ∈ [0, 1))."""
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.double()
    return torch.tan(math.pi * t / 2)


def cosine_t(sigma_edm) -> torch.Tensor:
    """Inverse of :func:`cosine_sigma`: t = (2/π)·atan(σ_EDM)."""
    s = torch.as_tensor(sigma_edm)
    if not s.is_floating_point():
        s = s.double()
    return (2 / math.pi) * torch.atan(s)



# Rectified flow (Liu et al. 2022) interpolates X_t = t·x_1 + (1 − t)·z (t = 1: data). Dividing by t gives
# fewstep's form, X_t / t = x_1 + ((1 − t)/t)·z: a flow state is t·x_σ at σ = (1 − t)/t, and its velocity
# v = dX_t/dt = x_1 − z is, for the denoiser's estimate x̂_1 = D(x_σ, σ), v̂ = (x̂_1 − X_t)/(1 − t).

def flow_sigma(t) -> torch.Tensor:
    """σ_EDM(t) = (1 − t)/t of rectified flow's X_t = t·x_1 + (1 − t)·z (t ∈ (0, 1])."""
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.double()
    return (1 - t) / t


def flow_t(sigma_edm) -> torch.Tensor:
    """Inverse of :func:`flow_sigma`: t = 1/(1 + σ)."""
    s = torch.as_tensor(sigma_edm)
    if not s.is_floating_point():
        s = s.double()
    return 1 / (1 + s)


def flow_velocity(denoised: torch.Tensor, x_sigma: torch.Tensor, sigma) -> torch.Tensor:
    """The flow velocity v̂ = (x̂_1 − X_t)/(1 − t) at X_t = t·x_σ, t = 1/(1 + σ), given x̂_1 = D(x_σ, σ).

    Equal to (D − x_σ)/σ + D (since X_t = x_σ/(1 + σ) and 1 − t = σ/(1 + σ)), the form evaluated here:
    it needs no X_t and keeps its precision as t → 1."""
    sigma = _bc(sigma, x_sigma)
    return (denoised - x_sigma) / sigma + denoised

# ---------------------------------------------------------------------------
# Continuous-time VP models
# ---------------------------------------------------------------------------

class VPDenoiser(nn.Module):
    """σ-space denoiser around a continuous-time VP model (DESIGN §1).

    ``model(x_t, t, labels)`` returns an ε, v or x_0 prediction for
    x_t = α_t x_0 + σ_t ε. Given x_σ and σ, we pick t = ``t_of_sigma_fn(σ)``, feed
    x_t = α_t·x_σ and convert the output to x̂_0.

    Args:
        model: the VP network, called as ``model(x_t, t, labels)`` with ``t`` of shape ``[N]``.
        alpha_fn, sigma_fn: t ↦ α_t, σ_t (tensors in, tensors out).
        t_of_sigma_fn: σ_EDM ↦ t, the inverse of t ↦ σ_t/α_t.
        prediction: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
    """

    def __init__(self, model: nn.Module | Callable, alpha_fn: Callable, sigma_fn: Callable,
                 t_of_sigma_fn: Callable, prediction: str = "epsilon"):
        super().__init__()
        self.model = model
        self.alpha_fn, self.sigma_fn, self.t_of_sigma_fn = alpha_fn, sigma_fn, t_of_sigma_fn
        self.prediction = check_prediction(prediction)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    @classmethod
    def cosine(cls, model, prediction: str = "v_prediction") -> "VPDenoiser":
        """A VP model on the cosine schedule (t ∈ [0, 1]), as progressive distillation uses."""
        return cls(model, lambda t: cosine_alpha_sigma(t)[0], lambda t: cosine_alpha_sigma(t)[1],
                   cosine_t, prediction)

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = as_sigma(sigma, x)
        t = self.t_of_sigma_fn(sigma)
        alpha = torch.as_tensor(self.alpha_fn(t), device=x.device, dtype=x.dtype)
        sigma_t = torch.as_tensor(self.sigma_fn(t), device=x.device, dtype=x.dtype)
        x_t = append_dims(alpha, x.ndim) * x  # the net sees x_t = α_t·x_σ
        out = self.model(x_t, t, labels).to(x.dtype)
        return prediction_to_x0(out, x_t, alpha, sigma_t, self.prediction)


# ---------------------------------------------------------------------------
# Discrete-timestep VP models (DDPM, diffusers)
# ---------------------------------------------------------------------------

class DiscreteVPDenoiser(nn.Module):
    """σ-space denoiser around a model trained on a discrete ``alphas_cumprod`` table.

    The table gives σ_i = √((1 − ᾱ_i)/ᾱ_i) for integer timesteps i = 0 … T−1. A σ
    in between is mapped to a fractional timestep by linear interpolation in
    log σ between the two neighbouring entries (k-diffusion's ``DiscreteSchedule``);
    σ outside [σ_min, σ_max] is clamped to t = 0 or T−1. The network is then called
    as ``model(x_t, t, labels)`` with x_t = α·x_σ, α = 1/√(1+σ²) — the exact VP
    scaling of the requested σ, so the conversion back to x̂_0 is consistent
    even between table entries (like ``EulerDiscreteScheduler.scale_model_input``).

    Args:
        model: VP network ``model(x_t, t, labels)`` predicting ε, v or x_0.
        alphas_cumprod: ``[T]`` table ᾱ_t (an entry of exactly 0, from a zero-terminal-SNR
            schedule, is raised to a tiny positive value, see :func:`lift_zero_snr`).
        prediction: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        quantize: round t to the nearest integer timestep instead of interpolating.
    """

    def __init__(self, model: nn.Module | Callable, alphas_cumprod, prediction: str = "epsilon",
                 quantize: bool = False):
        super().__init__()
        self.model = model
        self.prediction = check_prediction(prediction)
        self.quantize = bool(quantize)
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if a.numel() < 2 or not torch.isfinite(a).all() or (a > 1).any():
            raise FewstepError("alphas_cumprod must be a 1-D table of at least 2 values in (0, 1]")
        a = lift_zero_snr(a)
        sigmas = alphas_cumprod_to_sigmas(a)
        if (sigmas.diff() < 0).any():
            raise FewstepError("alphas_cumprod must be non-increasing (σ must grow with t)")
        self.register_buffer("alphas_cumprod", a, persistent=False)
        self.register_buffer("sigmas", sigmas, persistent=False)  # ascending, float64
        self.register_buffer("log_sigmas", sigmas.clamp(min=1e-30).log(), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool | None = None) -> torch.Tensor:
        """Fractional timestep for σ: linear interpolation in log σ over the table."""
        quantize = self.quantize if quantize is None else quantize
        sigma = torch.as_tensor(sigma)
        shape, dtype = sigma.shape, sigma.dtype if sigma.is_floating_point() else torch.float64
        log_s = sigma.to(self.log_sigmas).clamp(min=1e-30).log().flatten()
        dists = log_s[None, :] - self.log_sigmas[:, None]  # [T, M]
        if quantize:
            return dists.abs().argmin(dim=0).view(shape).to(dtype)
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.num_timesteps - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_s) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(shape).to(dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at a (fractional) timestep: interpolation in log σ between neighbouring entries."""
        t = torch.as_tensor(t)
        dtype = t.dtype if t.is_floating_point() else torch.float64
        t64 = t.to(self.log_sigmas).clamp(0, self.num_timesteps - 1)
        lo = t64.floor().long().clamp(max=self.num_timesteps - 2)
        w = t64 - lo
        log_s = (1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]
        return log_s.exp().to(dtype)

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = as_sigma(sigma, x)
        t = self.sigma_to_t(sigma).to(x.dtype)
        alpha, sigma_t = vp_alpha_sigma(sigma)  # σ_EDM = σ_t/α_t exactly
        x_t = append_dims(alpha, x.ndim) * x
        out = self.model(x_t, t, labels).to(x.dtype)
        return prediction_to_x0(out, x_t, alpha, sigma_t, self.prediction)


__all__ = [
    "PREDICTIONS", "eps_to_x0", "x0_to_eps", "v_to_x0", "v_to_eps", "x0_to_v", "eps_to_v",
    "prediction_to_x0", "check_prediction", "vp_alpha_sigma", "alphas_cumprod_to_sigmas",
    "linear_beta_alphas_cumprod", "lift_zero_snr", "cosine_alpha_sigma", "cosine_sigma", "cosine_t",
    "flow_sigma", "flow_t", "flow_velocity", "VPDenoiser", "DiscreteVPDenoiser",
]
