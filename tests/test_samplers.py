"""Samplers, σ schedules, the sample() front door and classifier-free guidance.

diffusers' schedulers serve as a second implementation: a DDIM / Euler step of
fewstep in σ-space must equal ``DDIMScheduler.step`` / ``EulerDiscreteScheduler.step``
on the same ε- or v-model after mapping timesteps to σ and x_t = α·x_σ.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.diffusion.conversions import DiscreteVPDenoiser, alphas_cumprod_to_sigmas, linear_beta_alphas_cumprod
from fewstep.diffusion.denoiser import karras_sigmas
from fewstep.diffusion.guidance import CFGDenoiser, cfg_combine
from fewstep.diffusion.mixture import preset
from fewstep.diffusion.samplers import (
    SAMPLERS, SampleResult, ddim, dpmpp_2m, euler, heun, make_sigmas, nfe, sample,
)
from fewstep.errors import FewstepError

TABLE = linear_beta_alphas_cumprod()  # DDPM linear β, T = 1000 (diffusers' default)


class VPMixtureModel(nn.Module):
    """A discrete-time VP model(x_t, t) → ε or v whose exact x̂0 comes from a mixture.

    t → ᾱ(t) by numpy interpolation of log σ over the table (fractional t allowed), so
    it is independent of fewstep's own σ ↔ t code. Inputs may be image-shaped.
    """

    def __init__(self, mix, prediction="epsilon"):
        super().__init__()
        self.den, self.prediction = mix.denoiser(), prediction
        self.log_s = alphas_cumprod_to_sigmas(TABLE).log().numpy()

    def forward(self, x_t, t, labels=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
        s = torch.from_numpy(np.exp(np.interp(t.numpy(), np.arange(len(self.log_s)), self.log_s)))
        a = (1 + s**2).rsqrt().view(-1, *([1] * (x_t.ndim - 1))).to(x_t)
        st = (1 - a**2).sqrt()
        x0 = self.den(x_t / a, s.to(x_t))
        eps = (x_t - a * x0) / st
        return eps if self.prediction == "epsilon" else a * eps - st * x0


class Counting(nn.Module):
    """Counts denoiser calls."""

    def __init__(self, den):
        super().__init__()
        self.den, self.calls = den, 0
        self.num_classes = getattr(den, "num_classes", 0)

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        return self.den(x, sigma, labels)


def _image_batch(n=6, seed=0):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


# --- diffusers as a second implementation ---------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_steps_equal_diffusers_ddim_scheduler(eta):
    from diffusers import DDIMScheduler

    model = VPMixtureModel(preset("mix16d"))
    sched = DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="trailing", prediction_type="epsilon")
    sched.set_timesteps(10)
    ac = sched.alphas_cumprod.double()
    den = DiscreteVPDenoiser(model, ac)
    sig = lambda t: float(((1 - ac[t]) / ac[t]).sqrt()) if t >= 0 else 0.0  # noqa: E731
    x_t = _image_batch()
    for i, t in enumerate(sched.timesteps.tolist()):
        prev = t - 1000 // 10
        a_t, a_prev = ac[t].sqrt().float(), (ac[prev].sqrt().float() if prev >= 0 else torch.tensor(1.0))
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(100 + i))
        want = sched.step(model(x_t, t), t, x_t, eta=eta, variance_noise=z).prev_sample
        # the same step in σ-space, starting from x_σ = x_t/α_t
        got = ddim(den, x_t / a_t, torch.tensor([sig(t), sig(prev)]), eta=eta,
                   generator=torch.Generator().manual_seed(100 + i))
        assert got.nfe == 1
        torch.testing.assert_close(got.x * a_prev, want, rtol=2e-4, atol=2e-4)
        x_t = want


def test_ddim_trajectory_on_vp_uniform_grid_equals_diffusers():
    from diffusers import DDIMScheduler

    model = VPMixtureModel(preset("mix16d"))
    sched = DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(10)
    x_t = _image_batch(seed=1)
    sigmas = make_sigmas("vp-uniform", 10)
    want_sigmas = [float(((1 - sched.alphas_cumprod[t]) / sched.alphas_cumprod[t]).sqrt()) for t in sched.timesteps]
    torch.testing.assert_close(sigmas, torch.tensor(want_sigmas + [0.0]))
    x_sigma = x_t * (1 + sigmas[0] ** 2).sqrt()
    for t in sched.timesteps:
        x_t = sched.step(model(x_t, t), t, x_t).prev_sample
    got = ddim(DiscreteVPDenoiser(model, TABLE), x_sigma, sigmas)
    torch.testing.assert_close(got.x, x_t, rtol=1e-3, atol=1e-3)  # ᾱ' = 1 at the end: x_σ = x_t


def test_vp_uniform_grid_has_steps_points_and_is_diffusers_trailing_grid_at_every_step_count():
    """The float arange of the trailing spacing yields one point too many (t = −1) for some counts
    (61, 103, 998, …); the grid keeps `steps` timesteps and equals DDIMScheduler's where it has them."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="trailing")
    a = sched.alphas_cumprod.double()
    for n in range(1, 1001):
        sigmas = make_sigmas("vp-uniform", n)
        assert sigmas.shape == (n + 1,) and (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1] == 0, n
        sched.set_timesteps(n)
        t = sched.timesteps[:n]
        want = ((1 - a[t]) / a[t]).sqrt().float()
        assert torch.equal(sigmas[:-1], want), n


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_steps_and_trajectory_equal_diffusers_euler_discrete(prediction):
    from diffusers import EulerDiscreteScheduler

    model = VPMixtureModel(preset("mix16d"), prediction)
    sched = EulerDiscreteScheduler(prediction_type=prediction, timestep_spacing="trailing")
    sched.set_timesteps(6)
    den = DiscreteVPDenoiser(model, sched.alphas_cumprod, prediction)
    x0 = _image_batch(seed=2) * sched.init_noise_sigma
    x = x0
    for i, t in enumerate(sched.timesteps):
        out = model(sched.scale_model_input(x, t), t)
        want = sched.step(out, t, x).prev_sample
        got = euler(den, x, sched.sigmas[i:i + 2])  # one step from diffusers' own state
        torch.testing.assert_close(got.x, want, rtol=1e-4, atol=1e-4 * float(sched.sigmas[i]))
        x = want
    whole = euler(den, x0, sched.sigmas)
    assert whole.nfe == 6
    torch.testing.assert_close(whole.x, x, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_heun_trajectory_equals_diffusers_heun_discrete(prediction):
    from diffusers import HeunDiscreteScheduler

    model = VPMixtureModel(preset("mix16d"), prediction)
    sched = HeunDiscreteScheduler(beta_start=1e-4, beta_end=0.02, prediction_type=prediction,
                                  timestep_spacing="trailing")
    sched.set_timesteps(5)
    x0 = _image_batch(seed=7) * sched.init_noise_sigma
    x = x0
    for t in sched.timesteps:  # 2·5 − 1 model calls: the last step (to σ = 0) is an Euler step
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
    sigmas = torch.cat([sched.sigmas[::2], torch.zeros(1)])  # diffusers repeats interior σ's
    got = heun(DiscreteVPDenoiser(model, sched.alphas_cumprod, prediction), x0, sigmas)
    assert got.nfe == len(sched.timesteps) == 9
    torch.testing.assert_close(got.x, x, rtol=1e-4, atol=1e-4)


def test_heun_churn_step_is_edm_algorithm_2():
    den = preset("ring8").denoiser()
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(8))
    s = torch.tensor([1.0, 0.5])
    gamma = 0.2  # = s_churn/steps with one step (below the √2 − 1 cap)
    churned = heun(den, x, s, generator=torch.Generator().manual_seed(9), s_churn=gamma, s_noise=1.007)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    s_hat = 1.0 * (1 + gamma)
    x_hat = x + 1.007 * math.sqrt(s_hat**2 - 1.0) * z  # raise the noise level to σ̂ = σ(1+γ)
    want = heun(den, x_hat, torch.tensor([s_hat, 0.5]))
    torch.testing.assert_close(churned.x, want.x)
    assert churned.nfe == 2
    # outside [s_tmin, s_tmax] no noise is added
    gated = heun(den, x, s, generator=torch.Generator().manual_seed(9), s_churn=gamma, s_tmax=0.9)
    torch.testing.assert_close(gated.x, heun(den, x, s).x)


def test_deterministic_ddim_is_euler_in_sigma_space():
    den = preset("ring8").denoiser()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(3)) * 80
    s = make_sigmas("karras", 7)
    torch.testing.assert_close(ddim(den, x, s).x, euler(den, x, s).x)
    # and one step is x' = x̂0 + (σ'/σ)(x − x̂0)
    x1 = ddim(den, x, s[:2]).x
    d = den(x, torch.full((50,), float(s[0])))
    torch.testing.assert_close(x1, d + s[1] / s[0] * (x - d))


# --- NFE, reproducibility, accuracy -----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_nfe_counts(name, steps):
    den = Counting(preset("ring8").denoiser())
    res = sample(den, (4, 2), sampler=name, steps=steps, seed=0)
    assert isinstance(res, SampleResult)
    assert res.nfe == den.calls == nfe(name, steps)
    assert nfe(name, steps) == (2 * steps - 1 if name == "heun" else steps)


def test_heun_18_karras_steps_is_35_nfe_and_2n_without_final_zero():
    den = Counting(preset("ring8").denoiser())
    assert sample(den, (3, 2), sampler="heun", steps=18, seed=0).nfe == 35 == den.calls
    s = karras_sigmas(5, append_zero=False)  # ends at σ_min > 0: every step is a Heun step
    assert heun(den, torch.randn(3, 2) * 80, s).nfe == 8


@pytest.mark.parametrize("sampler,kwargs", [("heun", {}), ("heun", {"s_churn": 20.0}), ("ddim", {"eta": 1.0}),
                                            ("euler", {}), ("dpmpp-2m", {})])
def test_seed_reproducibility_including_batch_chunking(sampler, kwargs):
    den = preset("grid25").denoiser()
    run = lambda **kw: sample(den, (10, 2), sampler=sampler, steps=6, **kwargs, **kw).x  # noqa: E731
    a = run(seed=11)
    assert torch.equal(a, run(seed=11))
    assert torch.equal(a, run(seed=11, batch_size=3))  # chunked: identical samples
    assert not torch.allclose(a, run(seed=12))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(run(generator=g1), run(generator=g2))


def test_stochastic_samplers_use_their_noise():
    den = preset("grid25").denoiser()
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0)) * 80
    s = make_sigmas("karras", 6)
    det = heun(den, x, s).x
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert not torch.allclose(heun(den, x, s, generator=g(), s_churn=40.0).x, det)
    assert torch.equal(heun(den, x, s, generator=g(), s_churn=40.0).x,
                       heun(den, x, s, generator=g(), s_churn=40.0).x)
    assert not torch.allclose(ddim(den, x, s, generator=g(), eta=1.0).x, ddim(den, x, s).x)


def test_dpmpp_2m_equals_diffusers_dpm_solver_multistep():
    from diffusers import DPMSolverMultistepScheduler

    model = VPMixtureModel(preset("mix16d"))
    sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                        lower_order_final=False, final_sigmas_type="zero",
                                        timestep_spacing="trailing")
    sched.set_timesteps(10)
    sigmas = make_sigmas("vp-uniform", 10)
    torch.testing.assert_close(sigmas, sched.sigmas.float())
    x_t = _image_batch(seed=6)
    x_sigma = x_t * (1 + sigmas[0] ** 2).sqrt()
    for t in sched.timesteps:
        x_t = sched.step(model(x_t, t), t, x_t).prev_sample
    got = dpmpp_2m(DiscreteVPDenoiser(model, TABLE), x_sigma, sigmas)
    assert got.nfe == 10
    torch.testing.assert_close(got.x, x_t, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ring8", "grid25", "mix16d"])
def test_dpmpp_2m_beats_euler_at_10_steps_against_a_heun_reference(name):
    """10 steps on DPM-Solver's own grid (uniform in log σ = uniform logSNR), same start noise.

    On the Karras ρ = 7 grid with only 10 steps DPM++(2M) is *not* uniformly better on these
    sharp mixtures (ring8: RMS error 0.14 vs Euler's 0.095; grid25 0.11 vs 0.20): there the
    first steps are ~1 in log σ wide while E[x0|x] still changes like e^λ, so the 2-step
    extrapolation overshoots. At 20 Karras steps it wins on all three presets.
    """
    mix = preset(name)
    den = mix.denoiser()
    x = torch.randn(300, mix.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 80
    ref = heun(den, x, make_sigmas("karras", 200).double()).x
    rms = lambda y: (y - ref).norm(dim=1).pow(2).mean().sqrt().item()  # noqa: E731
    s10 = make_sigmas("exponential", 10).double()
    err = {f.__name__: rms(f(den, x, s10).x) for f in (euler, dpmpp_2m)}
    assert err["dpmpp_2m"] < 0.8 * err["euler"], err
    s20 = make_sigmas("karras", 20).double()
    assert rms(dpmpp_2m(den, x, s20).x) < 0.8 * rms(euler(den, x, s20).x)
    # the Heun reference is converged: 100 vs 200 steps agree far better than any 10-step solver
    assert rms(heun(den, x, make_sigmas("karras", 100).double()).x) < 0.1 * err["dpmpp_2m"]


def test_heun_is_second_order():
    # on a smooth problem (one Gaussian, σ ∈ [0.5, 80]) doubling the steps cuts Heun's error ≈4×
    from fewstep.diffusion.mixture import GaussianMixture

    gauss = GaussianMixture([1.0], torch.tensor([[0.3, -0.2]]), torch.tensor([[[0.25, 0.1], [0.1, 0.2]]]))
    den = gauss.denoiser()
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 80
    grid = lambda n: karras_sigmas(n, 0.5, 80, append_zero=False).double()  # noqa: E731
    ref = heun(den, x, grid(400)).x
    e1 = (heun(den, x, grid(10)).x - ref).norm(dim=1).mean()
    e2 = (heun(den, x, grid(19)).x - ref).norm(dim=1).mean()  # 19 points = twice the intervals
    assert 3.0 < e1 / e2 < 5.0, (e1, e2)
    ee1 = (euler(den, x, grid(10)).x - ref).norm(dim=1).mean()
    ee2 = (euler(den, x, grid(19)).x - ref).norm(dim=1).mean()
    assert 1.5 < ee1 / ee2 < 2.5, (ee1, ee2)


# --- schedules and the front door ------------------------------------------------------------

def test_make_sigmas_schedules():
    torch.testing.assert_close(make_sigmas("karras", 18), karras_sigmas(18))
    for name in ("karras", "vp-uniform", "cosine", "exponential"):
        s = make_sigmas(name, 12)
        assert s.shape == (13,) and s[-1] == 0 and (s[1:] < s[:-1]).all(), name
    c = make_sigmas("cosine", 9, sigma_min=0.01, sigma_max=50).double()
    t = (2 / math.pi) * torch.atan(c[:-1])
    assert c[0].item() == pytest.approx(50, rel=1e-5) and c[-2].item() == pytest.approx(0.01, rel=1e-5)
    torch.testing.assert_close(t.diff(), torch.full((8,), float(t.diff()[0]), dtype=torch.float64))
    e = make_sigmas("exponential", 5).double()
    torch.testing.assert_close(e[:-1].log().diff(), torch.full((4,), math.log(0.002 / 80) / 4, dtype=torch.float64))
    v = make_sigmas("vp-uniform", 4)
    torch.testing.assert_close(v[:-1], alphas_cumprod_to_sigmas(TABLE)[[999, 749, 499, 249]].float())
    assert make_sigmas("vp-uniform", 1).tolist() == pytest.approx([157.4, 0.0], rel=1e-3)


def test_front_door_errors_list_choices():
    den = preset("ring8").denoiser()
    with pytest.raises(FewstepError, match="dpmpp-2m"):
        sample(den, (2, 2), sampler="plms")
    with pytest.raises(FewstepError, match="steps"):
        sample(den, (2, 2), steps=0)
    with pytest.raises(FewstepError, match="karras"):
        make_sigmas("linear", 5)
    with pytest.raises(FewstepError, match="steps"):
        nfe("euler", 0)
    with pytest.raises(FewstepError):
        euler(den, torch.zeros(2, 2), torch.tensor([0.0, 1.0]))  # increasing grid
    with pytest.raises(FewstepError, match="labels"):
        sample(den, (3, 2), steps=2, labels=torch.tensor([0, 1]))


def test_front_door_draws_sigma0_scaled_noise_and_accepts_aliases_and_sigmas():
    den = preset("ring8").denoiser()
    res = sample(den, (4000, 2), sampler="euler", sigmas=torch.tensor([80.0, 79.0]), seed=0)
    # one Euler step from 80 to 79 barely moves pure noise: std ≈ 79·(1 + tiny)
    assert abs(res.x.std().item() - 79.0) < 2.0 and res.nfe == 1
    assert sample(den, (2, 2), sampler="dpmpp_2m", steps=3, seed=0).nfe == 3
    seen = []
    euler(den, torch.randn(2, 2) * 80, make_sigmas("karras", 3), callback=lambda d: seen.append(d["i"]))
    assert seen == [0, 1, 2]


# --- classifier-free guidance ---------------------------------------------------------------

def test_cfg_combine():
    c, u = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(cfg_combine(c, u, 1.0), c)
    torch.testing.assert_close(cfg_combine(c, u, 0.0), u)
    torch.testing.assert_close(cfg_combine(c, u, 3.0), u + 3 * (c - u))
    torch.testing.assert_close(cfg_combine(c, u, torch.tensor([0.0, 1.0, 2.0])),
                               torch.stack([u[0], c[1], 2 * c[2] - u[2]]))


def test_cfg_denoiser_one_batched_pass_and_limits():
    mix = preset("ring8")
    inner = Counting(mix.denoiser(conditional=True))
    x, labels, s = torch.randn(5, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4]), 0.4
    d_c, d_u = mix.denoise(x, s, labels), mix.denoise(x, s)
    guided = CFGDenoiser(inner, scale=2.5)
    torch.testing.assert_close(guided(x, s, labels), d_u + 2.5 * (d_c - d_u))
    assert inner.calls == 1  # cond + uncond in one forward pass
    torch.testing.assert_close(CFGDenoiser(inner, 1.0)(x, s, labels), d_c)
    torch.testing.assert_close(CFGDenoiser(inner, 0.0)(x, s, labels), d_u)
    assert CFGDenoiser(inner, 2.0).null_label == 8 and CFGDenoiser(inner, 2.0, null_label=3).null_label == 3


def test_cfg_errors_and_guided_sampling_lands_in_the_class():
    mix = preset("ring8")
    with pytest.raises(FewstepError, match="labels"):
        CFGDenoiser(mix.denoiser(conditional=True), 2.0)(torch.zeros(2, 2), 1.0)
    with pytest.raises(FewstepError, match="null_label"):
        CFGDenoiser(mix.denoiser(), 2.0)
    labels = torch.arange(8).repeat(4)
    res = sample(CFGDenoiser(mix.denoiser(conditional=True), 1.5), (32, 2), labels=labels, steps=12, seed=0)
    assert torch.equal(mix.responsibilities(res.x).argmax(1), labels)


def test_guided_sampling_counts_both_evaluations_in_its_nfe():
    from fewstep.model import FewstepModel

    model = FewstepModel(preset("ring8").denoiser(conditional=True), {
        "type": "mixture", "data": {"kind": "points", "sample_shape": [2], "num_classes": 8, "name": "ring8"},
        "sampling": {"sampler": "heun", "steps": 3, "schedule": "karras"}})
    rows = []
    model.denoiser.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    for scale, want in ((None, 5), (1.0, 5), (0.0, 5), (2.0, 10)):
        rows.clear()
        res = model.sample(16, guidance=scale)
        assert res.nfe == want and sum(rows) == 16 * want, scale  # network evaluations per sample
