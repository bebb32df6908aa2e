"""The diffusers adapter on a tiny randomly initialised UNet2DModel (nothing is downloaded)."""
import numpy as np
import pytest
import torch

from fewstep.diffusion.samplers import SAMPLERS, make_sigmas, sample
from fewstep.errors import FewstepError
from fewstep.teachers.diffusers_adapter import from_diffusers, scheduler_alphas_cumprod

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

PREDICTIONS = ["epsilon", "v_prediction", "sample"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any attempt to download would fail loudly


def tiny_unet(num_class_embeds=None, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_class_embeds)
    return unet.eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _x(n=3, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _table_t(ac, sigma):
    """Independent σ → t: numpy interpolation of the timestep index over log σ (σ grows with t)."""
    log_s = np.log(np.sqrt((1 - ac.double().numpy()) / ac.double().numpy()))
    return float(np.interp(np.log(sigma), log_s, np.arange(len(log_s))))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_output_equals_hand_conversion_of_raw_unet_output(unet, prediction):
    sched = DDPMScheduler(prediction_type=prediction)
    den = from_diffusers(unet, sched)
    x = _x()
    for sigma in [0.05, 0.7, 3.0, 40.0]:
        t = _table_t(sched.alphas_cumprod, sigma)
        alpha = 1 / (1 + sigma**2) ** 0.5  # VP scale of x_σ; σ_t = σ·α
        x_t = alpha * x
        with torch.no_grad():
            raw = unet(x_t, torch.full((3,), t)).sample
            got = den(x, torch.full((3,), sigma))
        want = {"epsilon": x - sigma * raw,                              # (x_t − σ_t ε)/α
                "v_prediction": alpha * x_t - sigma * alpha * raw,       # α x_t − σ_t v
                "sample": raw}[prediction]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, sigma))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_x0_equals_ddpm_scheduler_pred_original_sample_at_integer_timesteps(unet, prediction):
    # diffusers' own x̂0 (DDPMScheduler.step(...).pred_original_sample) as a second implementation
    sched = DDPMScheduler(prediction_type=prediction, clip_sample=False)
    den = from_diffusers(unet, sched.config)  # via the config dict this time
    x_sigma = _x(seed=2)
    for t in [3, 250, 700, 999]:
        ac = sched.alphas_cumprod[t]
        sigma = ((1 - ac) / ac).sqrt().item()
        x_t = ac.sqrt() * x_sigma
        with torch.no_grad():
            step = sched.step(unet(x_t, t).sample, t, x_t, generator=torch.Generator().manual_seed(0))
            want = step.pred_original_sample
            got = den(x_sigma, sigma)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_config_dict_and_scheduler_give_the_same_table_and_denoiser(unet):
    for kwargs in ({}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                   {"beta_schedule": "squaredcos_cap_v2"}):
        sched = DDPMScheduler(**kwargs)
        a, b = from_diffusers(unet, sched), from_diffusers(unet, dict(sched.config))
        torch.testing.assert_close(a.alphas_cumprod, b.alphas_cumprod, rtol=0, atol=0)
        torch.testing.assert_close(a.alphas_cumprod, sched.alphas_cumprod.double(), rtol=0, atol=0)
    den = from_diffusers(unet, DDPMScheduler())
    assert den.sigma_min == pytest.approx(0.01, rel=1e-3) and den.sigma_max == pytest.approx(157.4, rel=1e-3)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_samples_with_every_sampler(unet, sampler, prediction):
    den = from_diffusers(unet, DDPMScheduler(prediction_type=prediction))
    res = sample(den, (2, 1, 8, 8), sampler=sampler, steps=3, seed=0, sigma_max=den.sigma_max)
    assert res.x.shape == (2, 1, 8, 8) and torch.isfinite(res.x).all()
    assert res.nfe == (5 if sampler == "heun" else 3)


def test_vp_uniform_schedule_uses_the_unets_own_table(unet):
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    den = from_diffusers(unet, sched)
    res = sample(den, (2, 1, 8, 8), sampler="ddim", steps=4, schedule="vp-uniform", seed=0)
    assert torch.isfinite(res.x).all()


def test_guided_sampling_on_vp_uniform_uses_the_unets_own_table():
    from fewstep.diffusion.guidance import CFGDenoiser

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    den = from_diffusers(tiny_unet(num_class_embeds=3, seed=1), sched, has_null_class=True)
    want = make_sigmas("vp-uniform", 3, alphas_cumprod=den.alphas_cumprod)
    assert float(want[0]) == pytest.approx(den.sigma_max, rel=1e-4)  # ≈ 14.6, not the linear table's 157
    guided = CFGDenoiser(den, 2.0)
    torch.testing.assert_close(guided.alphas_cumprod, den.alphas_cumprod)
    seen = []
    hook = den.register_forward_pre_hook(lambda m, args: seen.append(float(args[1].flatten()[0])))
    try:
        sample(guided, (2, 1, 8, 8), sampler="ddim", steps=3, schedule="vp-uniform", seed=0, labels=torch.tensor([0, 1]))
    finally:
        hook.remove()
    assert seen == pytest.approx(want[:-1].tolist(), rel=1e-5)


def test_class_labels_reach_the_unet():
    unet = tiny_unet(num_class_embeds=3, seed=1)
    with torch.no_grad():  # make the class embedding matter
        unet.class_embedding.weight.normal_(0, 5)
    den = from_diffusers(unet, DDPMScheduler())
    assert den.num_classes == 3
    x = _x(2, seed=3)
    with torch.no_grad():
        a, b = den(x, 1.0, torch.tensor([0, 0])), den(x, 1.0, torch.tensor([2, 2]))
        t = torch.full((2,), _table_t(DDPMScheduler().alphas_cumprod, 1.0))
        raw = unet(x / 2**0.5, t, class_labels=torch.tensor([2, 2])).sample
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, x - raw, rtol=1e-4, atol=1e-4)
    with pytest.raises(FewstepError, match="labels"):
        den(x, 1.0)
    with pytest.raises(FewstepError, match="has_null_class"):
        den(x, 1.0, torch.tensor([3, 3]))  # "no label" = 3 does not exist in this UNet
    null_aware = from_diffusers(unet, DDPMScheduler(), has_null_class=True)
    assert null_aware.num_classes == 2
    with torch.no_grad():
        torch.testing.assert_close(null_aware(x, 1.0, torch.tensor([2, 2])), b)


def test_unconditional_unet_rejects_labels(unet):
    with pytest.raises(FewstepError, match="unconditional"):
        from_diffusers(unet, DDPMScheduler())(_x(1), 1.0, torch.tensor([0]))


def test_clear_errors_for_unsupported_schedulers(unet):
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(FewstepError, match="prediction_type"):
        from_diffusers(unet, {**DDPMScheduler().config, "prediction_type": "flow_prediction"})
    with pytest.raises(FewstepError, match="alphas_cumprod"):
        from_diffusers(unet, FlowMatchEulerDiscreteScheduler())
    with pytest.raises(FewstepError, match="alphas_cumprod"):
        from_diffusers(unet, dict(FlowMatchEulerDiscreteScheduler().config))
    with pytest.raises(FewstepError, match="beta schedule"):
        scheduler_alphas_cumprod({"beta_schedule": "no-such-schedule", "num_train_timesteps": 10})
    with pytest.raises(FewstepError):
        from_diffusers(unet, 42)


def test_prediction_type_override_and_zero_snr_table(unet):
    den = from_diffusers(unet, DDPMScheduler(), prediction_type="v_prediction")
    assert den.prediction == "v_prediction"
    zsnr = from_diffusers(unet, DDPMScheduler(rescale_betas_zero_snr=True))
    assert np.isfinite(zsnr.sigma_max) and (zsnr.sigmas.diff() > 0).all()  # ᾱ_T = 0 lifted, σ monotone
