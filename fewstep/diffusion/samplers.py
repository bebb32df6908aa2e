"""Stateless samplers for σ-space denoisers (k-diffusion style).

Every sampler has one signature::

    sampler(denoiser, x, sigmas, labels=None, *, generator=None, callback=None, **options)
        -> SampleResult(x, nfe)

``x`` is the starting point at noise level ``sigmas[0]`` (already scaled by it),
``sigmas`` a decreasing 1-D grid usually ending in 0 (``steps = len(sigmas) − 1``),
and ``nfe`` the number of denoiser evaluations each sample took. All samplers
integrate the probability-flow ODE dx/dσ = (x − D(x, σ))/σ of the VE process
x_σ = x_0 + σ·ε (DESIGN §1), or its stochastic variants.

``generator`` may be one ``torch.Generator`` or a list with one per sample;
the latter is what :func:`sample` uses so that results do not depend on how a
batch is chunked. Noise is drawn on the generator's device (CPU unless the caller
passes a CUDA generator) and moved to ``x.device``, so seeds give the same samples on any device.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import FewstepError
from .conversions import (
    alphas_cumprod_to_sigmas, cosine_sigma, cosine_t, flow_sigma, flow_t, lift_zero_snr, linear_beta_alphas_cumprod,
)
from .denoiser import append_dims, karras_sigmas


class SampleResult(NamedTuple):
    """Samples ``x`` and the number of denoiser evaluations (per sample) that made them."""
    x: torch.Tensor
    nfe: int


Generator = torch.Generator | Sequence[torch.Generator] | None


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (CPU by default).

    A list of generators draws sample i from generator i (chunking-invariant).
    """
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else "cpu"
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=dev)
    else:
        if len(generator) != x.shape[0]:
            raise FewstepError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        z = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32, device=g.device)
                         for g in generator])
    return z.to(device=x.device, dtype=x.dtype)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """ODE derivative dx/dσ = (x − D(x, σ))/σ."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def _check_sigmas(sigmas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=x.dtype, device=x.device)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise FewstepError("sigmas must be a 1-D grid of at least 2 noise levels (e.g. [..., 0])")
    if (sigmas[1:] > sigmas[:-1]).any() or (sigmas < 0).any():
        raise FewstepError("sigmas must be non-negative and non-increasing")
    return sigmas


class _Counter:
    """Call the denoiser at a scalar σ and count evaluations."""

    def __init__(self, denoiser: nn.Module, x: torch.Tensor, labels):
        self.denoiser, self.labels, self.n = denoiser, labels, 0
        self.ones = x.new_ones(x.shape[0])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return self.denoiser(x, sigma * self.ones, self.labels)


def _report(callback, **info):
    if callback is not None:
        callback(info)


# ---------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------

@torch.no_grad()
def euler(denoiser: nn.Module, x: torch.Tensor, sigmas: torch.Tensor, labels=None, *,
          generator: Generator = None, callback: Callable | None = None) -> SampleResult:
    """Euler's method on the probability-flow ODE: x ← x + (σ' − σ)·(x − D(x, σ))/σ."""
    sigmas, model = _check_sigmas(sigmas, x), _Counter(denoiser, x, labels)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, x=x, i=i, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised)
        x = x + to_d(x, sigmas[i] * model.ones, denoised) * (sigmas[i + 1] - sigmas[i])
    return SampleResult(x, model.n)


@torch.no_grad()
def heun(denoiser: nn.Module, x: torch.Tensor, sigmas: torch.Tensor, labels=None, *,
         generator: Generator = None, callback: Callable | None = None, s_churn: float = 0.0,
         s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> SampleResult:
    """EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithms 1 and 2).

    With ``s_churn = 0`` it is the deterministic Algorithm 1. Otherwise each step
    with σ_i ∈ [s_tmin, s_tmax] first raises the noise to σ̂ = σ_i(1 + γ),
    γ = min(s_churn/steps, √2 − 1), by adding fresh noise (Algorithm 2). The step
    to σ = 0 is a plain Euler step, so N steps ending at 0 cost 2N − 1 evaluations
    (18 Karras steps = 35 NFE).
    """
    sigmas, model = _check_sigmas(sigmas, x), _Counter(denoiser, x, labels)
    steps = len(sigmas) - 1
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= float(s) <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:  # Algorithm 2, lines 5-6: x̂ = x + √(σ̂² − σ²)·S_noise·ε
            x = x + randn_like(x, generator) * s_noise * (s_hat**2 - s**2).sqrt()
        denoised = model(x, s_hat)
        _report(callback, x=x, i=i, sigma=s, sigma_hat=s_hat, denoised=denoised)
        d = to_d(x, s_hat * model.ones, denoised)
        x_next = x + d * (s_next - s_hat)
        if s_next > 0:  # 2nd-order correction (trapezoid rule)
            d_next = to_d(x_next, s_next * model.ones, model(x_next, s_next))
            x_next = x + (d + d_next) / 2 * (s_next - s_hat)
        x = x_next
    return SampleResult(x, model.n)


def ancestral_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """σ_up, σ_down of the stochastic DDIM step from σ to σ' in σ-space.

    DDIM's σ_η = η·√((1−ᾱ')/(1−ᾱ))·√(1 − ᾱ/ᾱ') expressed for x_σ = x_t/α_t is
    σ_up = η·(σ'/σ)·√(σ² − σ'²) (capped at σ'), and σ_down = √(σ'² − σ_up²).
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next * 0, sigma_next
    up = (eta * sigma_next / sigma * (sigma**2 - sigma_next**2).clamp(min=0).sqrt()).clamp(max=sigma_next)
    return up, (sigma_next**2 - up**2).sqrt()


@torch.no_grad()
def ddim(denoiser: nn.Module, x: torch.Tensor, sigmas: torch.Tensor, labels=None, *,
         generator: Generator = None, callback: Callable | None = None, eta: float = 0.0) -> SampleResult:
    """DDIM (Song et al. 2021) in σ-space.

    η = 0: the deterministic step x' = x̂_0 + (σ'/σ)(x − x̂_0) (identical to an
    Euler step of the VE ODE). η > 0: x' = x̂_0 + σ_down·ε̂ + σ_up·z with
    ε̂ = (x − x̂_0)/σ and fresh z from ``generator`` (η = 1 is DDPM's ancestral
    sampler). This equals diffusers' ``DDIMScheduler.step`` after x_t = α_t·x_σ.
    """
    sigmas, model = _check_sigmas(sigmas, x), _Counter(denoiser, x, labels)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s)
        _report(callback, x=x, i=i, sigma=s, sigma_hat=s, denoised=denoised)
        eps = (x - denoised) / s
        up, down = ancestral_sigmas(s, s_next, eta)
        x = denoised + down * eps
        if up > 0:
            x = x + up * randn_like(x, generator)
    return SampleResult(x, model.n)


@torch.no_grad()
def dpmpp_2m(denoiser: nn.Module, x: torch.Tensor, sigmas: torch.Tensor, labels=None, *,
             generator: Generator = None, callback: Callable | None = None) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022), as in k-diffusion's ``sample_dpmpp_2m``.

    In λ = −log σ with h = λ' − λ: x' = (σ'/σ)·x − (e^{−h} − 1)·D̃, where D̃ is D
    itself on the first step and the multistep extrapolation
    (1 + 1/(2r))·D_i − 1/(2r)·D_{i−1}, r = h_{i−1}/h_i, afterwards. The step to σ = 0
    returns the denoised estimate.
    """
    sigmas, model = _check_sigmas(sigmas, x), _Counter(denoiser, x, labels)
    lam = lambda s: -s.log()  # noqa: E731  λ = −log σ
    old = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s)
        _report(callback, x=x, i=i, sigma=s, sigma_hat=s, denoised=denoised)
        if s_next == 0:
            x = denoised
        else:
            h = lam(s_next) - lam(s)
            d = denoised
            if old is not None:
                r = (lam(s) - lam(sigmas[i - 1])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (s_next / s) * x - torch.expm1(-h) * d
        old = denoised
    return SampleResult(x, model.n)


@torch.no_grad()
def consistency(denoiser: nn.Module, x: torch.Tensor, sigmas: torch.Tensor, labels=None, *,
                generator: Generator = None, callback: Callable | None = None,
                boundary_sigma: float | None = None) -> SampleResult:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) for a consistency model f.

    x̂ = f(x, σ_i); while σ_{i+1} > 0 the next input is x̂ + √(σ_{i+1}² − σ_min²)·z with fresh z
    (σ_min = ``boundary_sigma``, by default the model's own ``boundary_sigma``); the step to σ = 0
    returns x̂. One step from σ_max is f(σ_max·z, σ_max). Meant for consistency models (``fewstep
    distill cd``); on a plain denoiser it is a stochastic re-noising sampler.
    """
    sigmas, model = _check_sigmas(sigmas, x), _Counter(denoiser, x, labels)
    floor = float(getattr(denoiser, "boundary_sigma", 0.0) if boundary_sigma is None else boundary_sigma)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s)
        _report(callback, x=x, i=i, sigma=s, sigma_hat=s, denoised=denoised)
        x = denoised
        if s_next > 0:
            x = x + randn_like(x, generator) * (s_next**2 - floor**2).clamp(min=0).sqrt()
    return SampleResult(x, model.n)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "euler": euler, "heun": heun, "ddim": ddim, "dpmpp-2m": dpmpp_2m, "consistency": consistency,
}


def get_sampler(name: str) -> Callable[..., SampleResult]:
    """Look a sampler up by name (``dpmpp_2m`` is accepted for ``dpmpp-2m``)."""
    key = str(name).lower().replace("_", "-")
    if key not in SAMPLERS:
        raise FewstepError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[key]


def nfe(sampler: str, steps: int) -> int:
    """Denoiser evaluations per sample for ``steps`` steps on a grid ending at σ = 0."""
    get_sampler(sampler)
    _check_steps(steps)
    return 2 * steps - 1 if str(sampler).lower() == "heun" else steps


def _check_steps(steps) -> int:
    if int(steps) != steps or steps < 1:
        raise FewstepError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


# ---------------------------------------------------------------------------
# σ schedules
# ---------------------------------------------------------------------------

SCHEDULES = {
    "karras": "EDM's ρ-spaced grid from sigma_max to sigma_min, then 0",
    "vp-uniform": "DDPM's linear-β 1000-step table at uniformly spaced integer timesteps "
                  "('trailing' spacing: starts at t = 999, σ ≈ 157), then 0",
    "cosine": "uniform t of the cosine logSNR schedule between t(sigma_max) and t(sigma_min), then 0",
    "exponential": "uniform in log σ (= DPM-Solver's uniform-logSNR spacing) from sigma_max to sigma_min, then 0",
    "consistency": "the first `steps` points of the (steps+1)-point Karras grid from sigma_max to sigma_min (σ_min "
                   "itself dropped: a consistency model is the identity there), then 0",
    "flow": "rectified flow's uniform time steps: t = 1/(1 + σ) uniformly spaced from t(sigma_max) to 1 (σ = 0), "
            "so Euler on it is the flow's Euler sampler (ignores sigma_min)",
}


def vp_uniform_sigmas(steps: int, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """σ at uniformly spaced timesteps of a discrete VP table, then 0.

    Uses 'trailing' spacing (Lin et al. 2024, Table 2; diffusers' ``timestep_spacing=
    "trailing"``): t_i = round(T − i·T/steps) − 1 for i = 0 … steps−1, so sampling starts
    at the table's last (noisiest) timestep and the final step lands on σ = 0, exactly
    as ``DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True)``.
    Defaults to DDPM's linear-β table (T = 1000).
    """
    a = linear_beta_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod)
    a = lift_zero_snr(a.to(torch.float64))
    n_train = a.shape[0]
    if steps > n_train:
        raise FewstepError(f"vp-uniform allows at most {n_train} steps, got {steps}")
    # diffusers' formula to the float (numpy's arange and rounding), cut to `steps` points: for some
    # counts (61, 103, …) the float arange has one point too many, t = −1, which would index the table's end
    t = torch.from_numpy(np.round(np.arange(n_train, 0, -n_train / steps))[:steps].astype(np.int64)) - 1
    s = alphas_cumprod_to_sigmas(a[t])
    return torch.cat([s, s.new_zeros(1)]).float()


def cosine_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """σ = tan(πt/2) at ``steps`` uniformly spaced t from t(σ_max) to t(σ_min), then 0."""
    t_hi, t_lo = cosine_t(torch.tensor(float(sigma_max))), cosine_t(torch.tensor(float(sigma_min)))
    t = torch.linspace(float(t_hi), float(t_lo), steps, dtype=torch.float64) if steps > 1 \
        else torch.tensor([float(t_hi)], dtype=torch.float64)
    return torch.cat([cosine_sigma(t), t.new_zeros(1)]).float()


def exponential_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """σ uniformly spaced in log σ from σ_max to σ_min (k-diffusion's ``get_sigmas_exponential``), then 0."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    log_s = torch.linspace(hi, lo, steps, dtype=torch.float64) if steps > 1 \
        else torch.tensor([hi], dtype=torch.float64)
    return torch.cat([log_s.exp(), log_s.new_zeros(1)]).float()


def consistency_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The evaluation points of a ``steps``-step consistency sampler: the (steps+1)-point Karras grid
    from σ_max to σ_min without σ_min (where f(x, σ_min) = x), then 0. One step: [σ_max, 0]."""
    s = karras_sigmas(steps + 1, sigma_min, sigma_max, rho, append_zero=False)
    return torch.cat([s[:steps], s.new_zeros(1)])


def flow_sigmas(steps: int, sigma_max: float = 80.0) -> torch.Tensor:
    """Rectified flow's sampling grid in σ: ``steps`` uniform steps of t = 1/(1 + σ) from t(σ_max) to 1.

    Euler's method on the probability-flow ODE down this grid is the flow's Euler sampler
    X_{t'} = X_t + (t' − t)·v̂ on X_t = t·x_σ (both are exact when D is constant on a step)."""
    t = torch.linspace(float(flow_t(float(sigma_max))), 1.0, steps + 1, dtype=torch.float64)
    s = flow_sigma(t)
    s[-1] = 0.0
    return s.float()


def make_sigmas(schedule: str, steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0, *, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """A decreasing float32 σ grid of ``steps + 1`` values ending in 0.

    ``schedule`` is one of :data:`SCHEDULES`. ``"vp-uniform"`` takes its range from
    the table (``alphas_cumprod``, default DDPM linear-β) and ignores sigma_min/sigma_max.
    """
    steps = _check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise FewstepError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if schedule == "karras":
        return karras_sigmas(steps, sigma_min, sigma_max, rho)
    if schedule == "vp-uniform":
        return vp_uniform_sigmas(steps, alphas_cumprod)
    if schedule == "cosine":
        return cosine_sigmas(steps, sigma_min, sigma_max)
    if schedule == "exponential":
        return exponential_sigmas(steps, sigma_min, sigma_max)
    if schedule == "consistency":
        return consistency_sigmas(steps, sigma_min, sigma_max, rho)
    if schedule == "flow":
        return flow_sigmas(steps, sigma_max)
    raise FewstepError(f"unknown sigma schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")


# ---------------------------------------------------------------------------
# front door
# ---------------------------------------------------------------------------

def _per_sample_seeds(seed: int, n: int) -> list[int]:
    """One seed per sample, derived from ``seed`` (so noise does not depend on chunking)."""
    return torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(int(seed))).tolist()


def initial_noise(shape, seed: int, device="cpu") -> torch.Tensor:
    """The unit-variance noise that :func:`sample` starts sample i from for this ``seed``.

    One-step generators draw their z with it, so a teacher and its student given the
    same seed start from the same noise (x_T = σ_max·z for the teacher, σ_init·z for G).
    """
    shape = tuple(int(s) for s in shape)
    gens = [torch.Generator().manual_seed(s) for s in _per_sample_seeds(seed, shape[0])]
    return randn_like(torch.empty(shape, device=device), gens)


def sample(denoiser: nn.Module, shape, *, sampler: str = "heun", steps: int = 18,
           schedule: str = "karras", sigmas: torch.Tensor | None = None, labels=None,
           seed: int | None = None, generator: torch.Generator | None = None,
           batch_size: int | None = None, device="cpu", sigma_min: float = 0.002,
           sigma_max: float = 80.0, rho: float = 7.0, **sampler_kwargs) -> SampleResult:
    """Draw ``shape[0]`` samples: x = σ_0·N(0, I), then run ``sampler`` down ``sigmas``.

    Args:
        denoiser: σ-space denoiser (already on ``device``).
        shape: full output shape ``(N, ...)``.
        sampler: one of :data:`SAMPLERS`; ``sampler_kwargs`` go to it (e.g. ``s_churn``, ``eta``).
        steps, schedule, sigma_min, sigma_max, rho: the grid (:func:`make_sigmas`), unless
            ``sigmas`` is given. ``"vp-uniform"`` uses ``denoiser.alphas_cumprod`` if present.
        labels: LongTensor ``[N]`` or an int for all samples.
        seed: makes the result reproducible: sample i always gets the same noise
            streams, whatever ``batch_size`` is (one CPU generator per sample).
        generator: alternatively one generator for everything (then results depend on chunking).
        batch_size: evaluate in chunks of this many samples.

    Returns:
        ``SampleResult(x, nfe)`` with ``nfe`` the evaluations per sample.
    """
    fn = get_sampler(sampler)
    if seed is not None and generator is not None:
        raise FewstepError("pass either seed or generator to sample(), not both")
    shape = tuple(int(s) for s in shape)
    n = shape[0]
    if n < 1:
        raise FewstepError(f"shape must start with a batch size >= 1, got {shape}")
    if sigmas is None:
        table = getattr(denoiser, "alphas_cumprod", None) if schedule == "vp-uniform" else None
        sigmas = make_sigmas(schedule, steps, sigma_min, sigma_max, rho, alphas_cumprod=table)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=device)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        labels = labels.expand(n) if labels.ndim == 0 else labels
        if labels.shape != (n,):
            raise FewstepError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    batch_size = n if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise FewstepError(f"batch_size must be >= 1, got {batch_size}")
    seeds = _per_sample_seeds(seed, n) if seed is not None else None

    outs, count = [], 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            # one CPU generator per sample of this chunk (built lazily: ~5 kB of state each)
            g = [torch.Generator().manual_seed(s) for s in seeds[start:stop]] if seeds is not None else generator
            x = torch.empty((stop - start,) + shape[1:], device=device)
            x = randn_like(x, g) * sigmas[0]
            lab = labels[start:stop] if labels is not None else None
            res = fn(denoiser, x, sigmas, lab, generator=g, **sampler_kwargs)
            outs.append(res.x)
            count = res.nfe
    return SampleResult(torch.cat(outs), count)


__all__ = [
    "SampleResult", "randn_like", "to_d", "euler", "heun", "ddim", "dpmpp_2m", "consistency", "ancestral_sigmas",
    "SAMPLERS", "get_sampler", "nfe", "SCHEDULES", "make_sigmas", "vp_uniform_sigmas",
    "cosine_sigmas", "exponential_sigmas", "consistency_sigmas", "flow_sigmas", "initial_noise", "sample",
]
