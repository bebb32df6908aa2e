"""Score distillation sampling (DreamFusion): the gradient is Diff-Instruct's with the fake denoiser replaced by
the representation itself, its expectation under a Gaussian teacher is the closed form σ²/(s² + σ²)·(x − μ), so
particles optimised with it collapse; the method, its CLI and exact resumption."""
import pytest
import torch

from fewstep.cli import main as cli_main
from fewstep.diffusion.mixture import GaussianMixture
from fewstep.errors import FewstepError
from fewstep.methods.diff_instruct import diff_instruct_generator_loss
from fewstep.methods.sds import SDS, SDSConfig, sds_loss
from fewstep.model import FewstepModel, load_model, mixture_model

from step_helpers import (NET, init_model, perturbed_conditional_denoiser, straight_and_resumed, three_mode_mixture,
                          train_config)


class Identity(torch.nn.Module):
    """The denoiser of a point mass at x: D(x_t, σ) = x, whatever the noise."""

    def __init__(self, x):
        super().__init__()
        self.x = x

    def forward(self, x_t, sigma, labels=None):
        return self.x.detach()


def test_the_sds_gradient_is_diff_instructs_with_the_representation_as_its_fake_denoiser():
    teacher = mixture_model("ring8").denoiser
    torch.manual_seed(0)
    x = torch.randn(32, 2, requires_grad=True)
    sigma, noise = torch.rand(32) * 3 + 0.05, torch.randn(32, 2)
    per, info = sds_loss(x, teacher, sigma=sigma, noise=noise)
    (g_sds,) = torch.autograd.grad(per.sum(), x)
    per_di, _ = diff_instruct_generator_loss(x, teacher, Identity(x), sigma=sigma, noise=noise)
    (g_di,) = torch.autograd.grad(per_di.sum(), x)
    torch.testing.assert_close(g_sds, g_di)
    # and it is σ·(ε̂ − ε) with ε̂ the teacher's noise estimate at x_σ
    x_t = x.detach() + sigma[:, None] * noise
    eps_hat = (x_t - teacher(x_t, sigma)) / sigma[:, None]
    torch.testing.assert_close(g_sds, sigma[:, None] * (eps_hat - noise))


def test_its_expectation_under_a_gaussian_teacher_is_the_closed_form():
    mu, s2 = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.09
    teacher = GaussianMixture([1.0], mu[None], torch.tensor([s2])).denoiser()
    x0 = torch.tensor([[1.0, 0.5]])
    for sigma in (0.2, 1.0, 4.0):
        m = 20000
        x = x0.repeat(m, 1).requires_grad_(True)
        gen = torch.Generator().manual_seed(1)
        noise = torch.randn(m, 2, generator=gen)
        per, _ = sds_loss(x, teacher, sigma=torch.full((m,), sigma), noise=noise)
        (g,) = torch.autograd.grad(per.sum(), x)
        expected = sigma**2 / (s2 + sigma**2) * (x0[0] - mu.float())
        err = 4 * g.std(0) / m**0.5  # four standard errors of the Monte-Carlo mean
        assert ((g.mean(0) - expected).abs() <= err + 1e-6).all(), (sigma, g.mean(0), expected, err)


def test_particles_optimised_with_sds_collapse():
    """Mode-seeking: free particles started as exact samples of a three-mode teacher end bunched together (their
    spread a fifth of the teacher's), nearly all by its heaviest mode (weight 0.5): SDS follows the noise-averaged
    density uphill, with no term that keeps the particles apart."""
    mix = three_mode_mixture()
    teacher = mix.denoiser()
    gen = torch.Generator().manual_seed(0)
    start = mix.sample(600, generator=gen)
    x = torch.nn.Parameter(start.float().clone())
    opt = torch.optim.Adam([x], lr=1e-2)
    torch.manual_seed(0)
    for _ in range(400):
        opt.zero_grad()
        per, _ = sds_loss(x, teacher)
        per.sum().backward()
        opt.step()
    assert (x.detach().std(0) < 0.25 * start.std(0)).all(), (x.detach().std(0), start.std(0))
    nearest = torch.cdist(x.detach(), mix.means.float()).argmin(1)
    assert (nearest == 1).float().mean() > 0.9


def test_the_generator_method_trains_and_refuses_guidance_without_classes(tmp_path):
    teacher = mixture_model("ring8")
    torch.manual_seed(0)
    m = SDS.create(SDSConfig(lr=1e-3), teacher=teacher, init=init_model(teacher))
    from fewstep.training.loop import Trainer
    Trainer(m, train_config(total_kimg=2.0, batch_size=100, grad_clip=None), tmp_path / "run").run_training()
    student = load_model(tmp_path / "run")
    assert student.is_generator and student.sample(10, seed=0).nfe == 1
    with pytest.raises(FewstepError, match="class-conditional"):
        SDS.create(SDSConfig(guidance=3.0), teacher=teacher, init=init_model(teacher))


def test_cli_sds_on_digits(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["distill", "sds", "--teacher", "shipped:digits", "--out", str(out), "--total-kimg", "0.064",
                     "--batch-size", "16", "--no-progress", "--snapshot-every-kimg", "100"]) == 0
    model = load_model(out)
    assert model.config["sampling"] == {"sampler": "one-step", "sigma_init": 2.5}
    assert torch.isfinite(model.sample(4, seed=0).x).all()


def test_a_killed_sds_run_resumes_exactly(tmp_path):
    teacher = mixture_model("ring8")

    def make():
        torch.manual_seed(0)
        return SDS.create(SDSConfig(lr=1e-3), teacher=teacher, init=init_model(teacher, net={**NET, "dropout": 0.1}))

    cfg = train_config(total_kimg=1.0, checkpoint_every_kimg=0.2, ema_halflife_kimg=0.5)
    full, resumed = straight_and_resumed(make, cfg, tmp_path)
    for k, v in full.G.state_dict().items():
        torch.testing.assert_close(resumed.G.state_dict()[k], v, rtol=0, atol=0)


# ---- proposed by the review of BOOT/SDS (mutation testing) -------------------------------------------------

def test_the_noise_levels_are_log_normal_with_the_given_parameters():
    """σ drawn by sds_loss: ln σ ~ N(p_mean, p_std²) for the p_mean, p_std it is given (within four standard errors),
    and x_σ = x + σ·ε with each sample's own σ."""
    teacher = mixture_model("ring8").denoiser
    torch.manual_seed(0)
    m, p_mean, p_std = 20000, 0.5, 0.3
    x = torch.randn(m, 2, requires_grad=True)
    noise = torch.randn(m, 2)
    _, info = sds_loss(x, teacher, noise=noise, p_mean=p_mean, p_std=p_std)
    ln = info["sigma"].log().double()
    assert abs(float(ln.mean()) - p_mean) < 4 * p_std / m**0.5, float(ln.mean())
    assert abs(float(ln.std()) - p_std) < 4 * p_std / (2 * m) ** 0.5, float(ln.std())
    torch.testing.assert_close(info["x_t"], x.detach() + info["sigma"][:, None] * noise)


def test_the_method_hands_its_guided_teacher_labels_and_sigma_law_to_sds_and_sums_the_loss(monkeypatch):
    """SDS.loss: labels of the teacher's classes, the teacher guided by κ (κ·D(x|c) + (1 − κ)·D(x|∅)), its p_mean and
    p_std, and the per-sample losses summed and scaled by loss_scale/batch (a loss of 1 per sample gives loss_scale)."""
    import fewstep.methods.sds as sds_mod

    net, den = perturbed_conditional_denoiser(0.3, num_classes=3)
    teacher = FewstepModel(den, {"type": "denoiser", "net": net, "precond": {"name": "edm", "sigma_data": 0.5},
                                 "data": {"kind": "points", "sample_shape": [2], "num_classes": 3, "name": "x"}})
    m = SDS.create(SDSConfig(guidance=2.5, p_mean=0.4, p_std=0.6, loss_scale=7.0), teacher=teacher)
    m.batch_size = 16
    seen = {}

    def spy(x, teacher, labels=None, **kw):
        seen.update(teacher=teacher, labels=labels, kw=kw)
        return x.flatten(1).sum(1) * 0 + 1.0, {"y_real": torch.zeros_like(x)}

    monkeypatch.setattr(sds_mod, "sds_loss", spy)
    loss, _ = m.loss(None)
    assert float(loss.detach()) == pytest.approx(7.0)
    assert (seen["kw"]["p_mean"], seen["kw"]["p_std"]) == (0.4, 0.6)
    labels = seen["labels"]
    assert labels is not None and labels.shape == (16,) and 0 <= int(labels.min()) and int(labels.max()) < 3
    torch.manual_seed(9)
    x, s = torch.randn(16, 2), torch.rand(16) * 3 + 0.1
    with torch.no_grad():
        d_c, d_u = den(x, s, labels), den(x, s, torch.full_like(labels, 3))
        torch.testing.assert_close(seen["teacher"](x, s, labels), d_u + 2.5 * (d_c - d_u))
