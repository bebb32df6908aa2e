"""ε / v / x0 conversions and VP → σ-space denoisers (DESIGN §1)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.diffusion.conversions import (
    DiscreteVPDenoiser, VPDenoiser, alphas_cumprod_to_sigmas, cosine_alpha_sigma, cosine_sigma,
    cosine_t, eps_to_v, eps_to_x0, linear_beta_alphas_cumprod, prediction_to_x0, v_to_eps, v_to_x0,
    vp_alpha_sigma, x0_to_eps, x0_to_v,
)
from fewstep.diffusion.mixture import preset
from fewstep.errors import FewstepError

SIGMAS = [0.01, 0.2, 1.0, 5.0, 60.0]


def _batch(n=7, shape=(3, 4, 4), vp=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n,) + shape, generator=g, dtype=torch.float64)
    eps = torch.randn((n,) + shape, generator=g, dtype=torch.float64)
    alpha = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    sigma = (1 - alpha**2).sqrt() if vp else torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.1
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    return x0, eps, alpha, sigma, x_t


@pytest.mark.parametrize("vp", [True, False])
def test_eps_v_x0_round_trips_recover_the_truth(vp):
    x0, eps, a, s, x_t = _batch(vp=vp)
    v = a.view(-1, 1, 1, 1) * eps - s.view(-1, 1, 1, 1) * x0  # v's definition
    torch.testing.assert_close(eps_to_x0(x_t, eps, a, s), x0)
    torch.testing.assert_close(x0_to_eps(x_t, x0, a, s), eps)
    torch.testing.assert_close(v_to_x0(x_t, v, a, s), x0)
    torch.testing.assert_close(v_to_eps(x_t, v, a, s), eps)
    torch.testing.assert_close(x0_to_v(x_t, x0, a, s), v)
    torch.testing.assert_close(eps_to_v(x_t, eps, a, s), v)
    for pred, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        torch.testing.assert_close(prediction_to_x0(out, x_t, a, s, pred), x0)


def test_design_vp_formula_for_v():
    # DESIGN §1 on a VP schedule: x̂0 = α x_t − σ v̂
    x0, eps, a, s, x_t = _batch(vp=True)
    v = torch.randn_like(x0)
    torch.testing.assert_close(v_to_x0(x_t, v, a, s), a.view(-1, 1, 1, 1) * x_t - s.view(-1, 1, 1, 1) * v)


def test_scalar_coefficients_broadcast():
    x_t, eps = torch.randn(4, 2), torch.randn(4, 2)
    torch.testing.assert_close(eps_to_x0(x_t, eps, 0.6, 0.8), (x_t - 0.8 * eps) / 0.6)


def test_vp_alpha_sigma_and_cosine_schedule():
    s = torch.tensor(SIGMAS, dtype=torch.float64)
    a, st = vp_alpha_sigma(s)
    torch.testing.assert_close(a**2 + st**2, torch.ones_like(s))
    torch.testing.assert_close(st / a, s)
    t = torch.linspace(0, 0.99, 12, dtype=torch.float64)
    ca, cs = cosine_alpha_sigma(t)
    torch.testing.assert_close(ca, torch.cos(math.pi * t / 2))
    torch.testing.assert_close(ca**2 + cs**2, torch.ones_like(t))
    torch.testing.assert_close(cosine_sigma(t), cs / ca)
    torch.testing.assert_close(cosine_t(cosine_sigma(t)), t)
    assert cosine_t(torch.tensor(0.0)).item() == 0.0
    assert cosine_sigma(torch.tensor(0.5)).item() == pytest.approx(1.0)


# --- VP models built from the exact mixture denoiser ---------------------------------------

class VPFromDenoiser(nn.Module):
    """Turn an exact σ-space denoiser into a VP model predicting ε, v or x0 on (α(t), σ(t))."""

    def __init__(self, den, alpha_fn, sigma_fn, prediction):
        super().__init__()
        self.den, self.alpha_fn, self.sigma_fn, self.prediction = den, alpha_fn, sigma_fn, prediction

    def forward(self, x_t, t, labels=None):
        a, s = self.alpha_fn(t).view(-1, 1), self.sigma_fn(t).view(-1, 1)
        x0 = self.den(x_t / a, (s / a).flatten())  # written directly from x_t = α x0 + σ ε
        eps = (x_t - a * x0) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.prediction]


def _linear_vp():
    """Score-SDE's continuous VP schedule, log ᾱ(t) = −½t²(β1−β0) − tβ0, and its exact inverse."""
    b0, b1 = 0.1, 20.0
    alpha = lambda t: torch.exp(-0.25 * t**2 * (b1 - b0) - 0.5 * t * b0)  # noqa: E731
    sigma = lambda t: (1 - alpha(t) ** 2).sqrt()  # noqa: E731
    t_of = lambda s: (-b0 + (b0**2 + 2 * (b1 - b0) * torch.log1p(s**2)).sqrt()) / (b1 - b0)  # noqa: E731
    return alpha, sigma, t_of


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_vp_model_from_exact_denoiser_converts_back_to_it(prediction, schedule):
    mix = preset("ring8")
    den = mix.denoiser()
    if schedule == "cosine":
        alpha, sigma = (lambda t: cosine_alpha_sigma(t)[0]), (lambda t: cosine_alpha_sigma(t)[1])
        t_of = cosine_t
    else:
        alpha, sigma, t_of = _linear_vp()
    vp = VPDenoiser(VPFromDenoiser(den, alpha, sigma, prediction), alpha, sigma, t_of, prediction)
    g = torch.Generator().manual_seed(3)
    for s in SIGMAS:
        x = mix.sample(64, g, dtype=torch.float64) + s * torch.randn(64, 2, generator=g, dtype=torch.float64)
        torch.testing.assert_close(vp(x, s), den(x, s), rtol=1e-7, atol=1e-7 * max(1.0, s))


def test_vp_denoiser_cosine_constructor_and_errors():
    model = VPFromDenoiser(preset("ring8").denoiser(), lambda t: cosine_alpha_sigma(t)[0],
                           lambda t: cosine_alpha_sigma(t)[1], "v_prediction")
    x = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(VPDenoiser.cosine(model)(x, 0.7), model.den(x, 0.7))
    with pytest.raises(FewstepError, match="prediction"):
        VPDenoiser(model, None, None, None, prediction="flow")


# --- discrete tables ------------------------------------------------------------------------

def test_linear_beta_table_matches_diffusers_and_sigmas():
    from diffusers import DDPMScheduler

    a = linear_beta_alphas_cumprod()
    torch.testing.assert_close(a, DDPMScheduler().alphas_cumprod, rtol=0, atol=0)
    den = DiscreteVPDenoiser(lambda x, t, l: x, a)
    torch.testing.assert_close(den.sigmas, ((1 - a.double()) / a.double()).sqrt())
    assert den.sigmas.shape == (1000,) and (den.sigmas.diff() > 0).all()
    assert den.sigma_min == pytest.approx(0.01, rel=1e-3)  # √(β_0/(1−β_0)) with β_0 = 1e-4
    assert den.sigma_max == pytest.approx(157.4, rel=1e-3)
    assert den.num_timesteps == 1000


def test_discrete_sigma_t_inverse_and_diffusers_interpolation():
    from diffusers import EulerDiscreteScheduler

    den = DiscreteVPDenoiser(lambda x, t, l: x, linear_beta_alphas_cumprod())
    t = torch.tensor([0.0, 0.25, 1.5, 17.3, 500.0, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(den.sigma_to_t(den.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    ints = torch.arange(0, 1000, 37)
    torch.testing.assert_close(den.t_to_sigma(ints), den.sigmas[ints])
    s = torch.exp(torch.linspace(math.log(0.02), math.log(150), 50, dtype=torch.float64))
    torch.testing.assert_close(den.t_to_sigma(den.sigma_to_t(s)), s)
    # a second implementation: diffusers' k-diffusion-style _sigma_to_t
    sched = EulerDiscreteScheduler()
    log_sigmas = np.log(den.sigmas.numpy())
    want = np.array([sched._sigma_to_t(np.array(v), log_sigmas) for v in s.numpy()]).ravel()
    np.testing.assert_allclose(den.sigma_to_t(s).numpy(), want, rtol=1e-9, atol=1e-9)
    # out-of-range σ are clamped to the table's ends; quantize rounds to the nearest entry
    assert den.sigma_to_t(torch.tensor([1e-4, 0.0, 1e4])).tolist() == [0.0, 0.0, 999.0]
    assert den.sigma_to_t(den.t_to_sigma(torch.tensor(17.3)), quantize=True).item() == 17.0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_discrete_model_from_exact_denoiser_converts_back_to_it(prediction):
    mix = preset("grid25")
    den = mix.denoiser()
    a = linear_beta_alphas_cumprod()
    log_s = alphas_cumprod_to_sigmas(a).log().numpy()

    def table_sigma(t):  # independent t → σ lookup (numpy interpolation in log σ)
        return torch.from_numpy(np.exp(np.interp(t.double().numpy(), np.arange(1000), log_s)))

    alpha = lambda t: (1 + table_sigma(t) ** 2).rsqrt()  # noqa: E731
    sigma = lambda t: table_sigma(t) * alpha(t)  # noqa: E731
    model = VPFromDenoiser(den, alpha, sigma, prediction)
    dvp = DiscreteVPDenoiser(model, a, prediction)
    g = torch.Generator().manual_seed(4)
    for s in [0.02, 0.3, 1.0, 8.0, 120.0]:
        x = mix.sample(32, g, dtype=torch.float64) + s * torch.randn(32, 2, generator=g, dtype=torch.float64)
        torch.testing.assert_close(dvp(x, s), den(x, s), rtol=1e-6, atol=1e-6 * max(1.0, s))


def test_discrete_passes_fractional_t_labels_and_alpha_scaling():
    seen = {}

    def model(x_t, t, labels):
        seen.update(x_t=x_t, t=t, labels=labels)
        return torch.zeros_like(x_t)

    den = DiscreteVPDenoiser(model, linear_beta_alphas_cumprod())
    x = torch.randn(3, 1, 2, 2)
    sig = den.t_to_sigma(torch.tensor([10.5, 200.25, 700.75])).float()
    out = den(x, sig, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(seen["t"], torch.tensor([10.5, 200.25, 700.75]), rtol=0, atol=1e-3)
    torch.testing.assert_close(seen["x_t"], x / (1 + sig.view(-1, 1, 1, 1) ** 2).sqrt())
    assert seen["labels"].tolist() == [0, 1, 2]
    torch.testing.assert_close(out, x)  # ε̂ = 0 ⇒ x̂0 = x_σ


def test_discrete_table_validation():
    with pytest.raises(FewstepError):
        DiscreteVPDenoiser(lambda *a: a[0], torch.tensor([0.5, 0.9]))  # increasing ᾱ: σ shrinks
    with pytest.raises(FewstepError):
        DiscreteVPDenoiser(lambda *a: a[0], torch.tensor([1.5, 0.9]))
    with pytest.raises(FewstepError, match="prediction"):
        DiscreteVPDenoiser(lambda *a: a[0], linear_beta_alphas_cumprod(), prediction="flow")
    zero_snr = torch.linspace(0.999, 0.0, 10, dtype=torch.float64)  # ᾱ_T = 0 is lifted to 2^-24 as in diffusers
    den = DiscreteVPDenoiser(lambda *a: a[0], zero_snr)
    assert den.alphas_cumprod[-1] == 2.0**-24 and den.sigma_max == pytest.approx(2.0**12, rel=1e-6)
