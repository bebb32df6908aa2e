"""Rectified flow by reflow (DESIGN §3): the flow ↔ σ-space conversions, the `flow` schedule against
diffusers' flow-matching Euler scheduler, the reflow loss against its closed forms (the exact reflow of a
Gaussian teacher is straight, its loss and straightness exactly zero), and trained flows that are
straighter than their teacher."""
import json
import math

import pytest
import torch
from torch import nn

from fewstep.cli import main as cli_main
from fewstep.diffusion.conversions import flow_sigma, flow_t, flow_velocity
from fewstep.diffusion.mixture import GaussianMixture
from fewstep.diffusion.samplers import euler, heun, make_sigmas
from fewstep.errors import FewstepError
from fewstep.diffusion.samplers import initial_noise
from fewstep.eval.straightness import model_straightness, straightness
from fewstep.methods.kd import KDConfig, KnowledgeDistillation, kd_loss, load_pairs
from fewstep.methods.reflow import Reflow, ReflowConfig, reflow_loss, sample_flow_times, straight_path
from fewstep.model import FewstepModel, balanced_labels, load_model, save_model
from fewstep.training.loop import Trainer

from step_helpers import NET, init_model, perturbed_conditional_denoiser, straight_and_resumed, train_config as _cfg

SIGMA0 = 80.0


def test_flow_time_and_velocity_are_rectified_flows():
    t = torch.rand(50, dtype=torch.float64) * 0.98 + 0.01
    torch.testing.assert_close(flow_t(flow_sigma(t)), t, rtol=0, atol=1e-15)
    x_sigma, d = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    sigma = flow_sigma(t)
    x_t = t[:, None] * x_sigma  # X_t = t·x_σ
    torch.testing.assert_close(flow_velocity(d, x_sigma, sigma), (d - x_t) / (1 - t[:, None]), rtol=1e-12, atol=1e-12)
    # along an exact straight line X_t = t·x_1 + (1 − t)·z, with D = x_1, the velocity is x_1 − z
    x1, z = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    line = (t[:, None] * x1 + (1 - t[:, None]) * z) / t[:, None]
    torch.testing.assert_close(flow_velocity(x1, line, sigma), x1 - z, rtol=1e-10, atol=1e-10)


def test_flow_schedule_is_uniform_in_t_and_ends_at_zero():
    s = make_sigmas("flow", 4, sigma_max=3.0)
    torch.testing.assert_close(flow_t(s.double()), torch.tensor([0.25, 0.4375, 0.625, 0.8125, 1.0],
                                                                dtype=torch.float64), rtol=0, atol=1e-7)
    assert s[-1] == 0 and s[0] == pytest.approx(3.0)
    assert make_sigmas("flow", 1).tolist() == [80.0, 0.0]


def test_euler_on_the_flow_schedule_is_diffusers_flow_match_euler():
    """A second implementation: diffusers' FlowMatchEulerDiscreteScheduler integrates x_s = (1 − s)·x_1 + s·z
    with the model output z − x_1; fed fewstep's denoiser, it retraces Euler on the `flow` grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    den = load_model("mixture:ring8").denoiser
    steps = 6
    sig = make_sigmas("flow", steps)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    ours = euler(den, z * sig[0], sig).x
    sched = FlowMatchEulerDiscreteScheduler()
    s_fm = (1 - flow_t(sig[:-1].double())).float()  # s = 1 − t
    sched.set_timesteps(sigmas=s_fm.tolist())
    torch.testing.assert_close(sched.sigmas, torch.cat([s_fm, s_fm.new_zeros(1)]), rtol=0, atol=1e-7)
    x = z * s_fm[0]  # X at s_0: (1 − t_0)·z = t_0·σ_0·z
    for i, ts in enumerate(sched.timesteps):
        s = sched.sigmas[i]
        x_sigma, sigma = x / (1 - s), s / (1 - s)  # x_σ = X_t / t, σ = (1 − t)/t
        d = den(x_sigma, sigma.expand(x.shape[0]))
        out = -flow_velocity(d, x_sigma, sigma)  # diffusers' flow model output: z − x_1 = −v
        x = sched.step(out, ts, x).prev_sample
    torch.testing.assert_close(x, ours, rtol=1e-4, atol=1e-5)


def test_straight_path_ends_where_the_teachers_sampler_starts_and_ends():
    z, x1 = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t0 = 1 / (1 + SIGMA0)
    x_sigma, sigma, z_end = straight_path(z, x1, SIGMA0, torch.full((8,), t0, dtype=torch.float64))
    torch.testing.assert_close(sigma, torch.full((8,), SIGMA0, dtype=torch.float64))
    torch.testing.assert_close(x_sigma, SIGMA0 * z, rtol=1e-12, atol=1e-12)  # the sampler's start σ_0·z
    x_sigma, sigma, _ = straight_path(z, x1, SIGMA0, torch.full((8,), 1.0, dtype=torch.float64))
    assert (sigma == 0).all() and torch.equal(x_sigma, x1)
    # X_t = t·x_1 + (1 − t)·z̃ is linear in t
    t = torch.rand(8, dtype=torch.float64) * 0.9 + 0.05
    x_sigma, _, _ = straight_path(z, x1, SIGMA0, t)
    torch.testing.assert_close(t[:, None] * x_sigma, t[:, None] * x1 + (1 - t[:, None]) * z_end, rtol=1e-12,
                               atol=1e-12)


def test_reflow_loss_is_velocity_weighted_denoising_and_kd_at_the_start():
    den = init_model(load_model("mixture:ring8"), seed=1).denoiser.double()
    for p in den.parameters():
        p.data.normal_(0, 0.2)  # away from the zero-initialised output layer
    g = torch.Generator().manual_seed(0)
    z, x1 = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randn(32, 2, generator=g, dtype=torch.float64)
    t = sample_flow_times(32, SIGMA0, 0.002, generator=g).double()
    assert (t >= 1 / 81).all() and (t <= 1 / 1.002).all()
    x_sigma, sigma, _ = straight_path(z, x1, SIGMA0, t)
    with torch.no_grad():
        per = reflow_loss(den, z, x1, SIGMA0, t)
        want = (den(x_sigma, sigma) - x1).pow(2).mean(1) * ((1 + sigma) / sigma) ** 2  # ‖D − x_1‖²·((1+σ)/σ)²
        torch.testing.assert_close(per, want, rtol=1e-9, atol=0)
        t0 = torch.full((32,), 1 / (1 + SIGMA0), dtype=torch.float64)
        at_start = reflow_loss(den, z, x1, SIGMA0, t0)
        torch.testing.assert_close(at_start, kd_loss(den, z, x1, SIGMA0) * ((1 + SIGMA0) / SIGMA0) ** 2,
                                   rtol=1e-9, atol=0)
        l1 = reflow_loss(den, z, x1, SIGMA0, t, loss="l1")
    assert (l1 > 0).all() and not torch.allclose(l1, per)


# ---- the exact reflow of a Gaussian teacher --------------------------------------------------------

MU, S = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.4


def _ode_map(z):
    """The teacher's exact probability-flow ODE map from σ_0·z for data N(μ, s²I): (x_σ − μ)/√(s² + σ²) is constant."""
    return MU + (SIGMA0 * z - MU) * S / math.sqrt(S ** 2 + SIGMA0 ** 2)


class ExactReflow(nn.Module):
    """E[x_1 | x_σ] on the pairs' straight lines: x_1 = a·z + b and z̃ = z − x_1/σ_0 are affine in z, so each
    x_σ = x_1 + σ·z̃ lies on exactly one line (a + σ(1 − a/σ_0) > 0): solve for z, return x_1(z)."""

    def forward(self, x, sigma, labels=None):
        a = SIGMA0 * S / math.sqrt(S ** 2 + SIGMA0 ** 2)
        b = MU * (1 - S / math.sqrt(S ** 2 + SIGMA0 ** 2))
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        z = (x - b * (1 - sigma / SIGMA0)) / (a + sigma * (1 - a / SIGMA0))
        return a * z + b


def test_the_exact_reflow_of_a_gaussian_teacher_is_straight_and_one_step_exact():
    teacher = GaussianMixture([1.0], MU[None], torch.tensor([S ** 2])).denoiser()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 2, generator=g, dtype=torch.float64)
    sig = make_sigmas("karras", 256).double()
    torch.testing.assert_close(heun(teacher, z * SIGMA0, sig).x, _ode_map(z), rtol=0, atol=1e-3)  # the pairs
    x1, t = _ode_map(z), sample_flow_times(400, SIGMA0, 0.002, generator=g).double()
    exact = ExactReflow()
    with torch.no_grad():
        assert reflow_loss(exact, z, x1, SIGMA0, t).max() < 1e-20  # the minimiser: zero loss on every line
        teacher_loss = reflow_loss(teacher, z, x1, SIGMA0, t).mean()
    assert teacher_loss > 1e-3  # the teacher's own flow is not straight on its pairs
    s_exact = straightness(exact, z, sigma_max=SIGMA0, steps=50)
    s_teacher = straightness(teacher, z, sigma_max=SIGMA0, steps=50)
    assert s_exact["straightness"] < 1e-12 and s_teacher["relative"] > 0.05, (s_exact, s_teacher)
    one = make_sigmas("flow", 1).double()
    torch.testing.assert_close(euler(exact, z * SIGMA0, one).x, x1, rtol=0, atol=1e-12)  # one Euler step is exact
    assert (euler(teacher, z * SIGMA0, one).x - x1).abs().max() > 0.1


# ---- training ------------------------------------------------------------------------------------------

def test_reflow_straightens_the_ring8_teacher_and_samples_in_few_steps(tmp_path):
    teacher = load_model("mixture:ring8")
    torch.manual_seed(0)
    m = Reflow.create(ReflowConfig(n_pairs=4000, chunk=1000, lr=3e-3), teacher=teacher,
                      init=init_model(teacher, {**NET, "width": 64}))
    assert m.sigma_min == 0.002  # an exact teacher has no σ table: the default
    Trainer(m, _cfg(total_kimg=30.0, batch_size=256, ema_halflife_kimg=0, checkpoint_every_kimg=1000,
                    log_every_kimg=1000), tmp_path / "run").run_training()
    flow = load_model(tmp_path / "run")
    assert not flow.is_generator and flow.nfe() == 1
    assert flow.sampling == {"sampler": "euler", "steps": 1, "schedule": "flow", "sigma_max": 80.0}
    assert flow.config["provenance"]["rectified"] == 2
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))  # fresh noise, not the pairs'
    sig = make_sigmas("karras", 18)
    x_teacher = heun(teacher.denoiser, z * sig[0], sig).x  # the teacher's ODE map
    err = {}
    for k in (1, 2):
        s = make_sigmas("flow", k)
        err[k] = [float((euler(d, z * s[0], s).x - x_teacher).norm(dim=1).mean()) for d in (flow.denoiser,
                                                                                           teacher.denoiser)]
    assert err[1][0] < 0.15 and err[1][0] < 0.25 * err[1][1], err  # measured 0.116 vs 0.720
    assert err[2][0] < 0.5 * err[2][1], err  # 0.089 vs 0.450
    s_flow, s_teacher = straightness(flow.denoiser, z), straightness(teacher.denoiser, z)
    assert s_flow["straightness"] < 0.05 * s_teacher["straightness"], (s_flow, s_teacher)  # 0.0025 vs 0.238


def test_cli_reflow_twice_then_kd(tmp_path, capsys):
    teacher = load_model("mixture:ring8")
    init = init_model(teacher)
    save_model(tmp_path / "init", init.denoiser, init.config)
    common = ["--total-kimg", "0.4", "--batch-size", "100", "--no-progress", "--snapshot-every-kimg", "100",
              "--checkpoint-every-kimg", "100"]
    assert cli_main(["distill", "reflow", "--teacher", "mixture:ring8", "--init", str(tmp_path / "init"),
                     "--out", str(tmp_path / "rf2"), "--n-pairs", "120", "--chunk", "50", "--steps", "5",
                     *common]) == 0
    for steps, nfe in ((None, 1), ("3", 3)):
        extra = ["--steps", steps] if steps else []
        assert cli_main(["sample", str(tmp_path / "rf2"), "--n", "16", "--out", str(tmp_path / "x.npy"), *extra]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nfe"] == nfe
    # a reflow of the reflow: its pairs from the 2-rectified flow's Euler sampler, here with 4 steps
    assert cli_main(["distill", "reflow", "--teacher", str(tmp_path / "rf2"), "--out", str(tmp_path / "rf3"),
                     "--n-pairs", "100", "--steps", "4", *common]) == 0
    rf3 = load_model(tmp_path / "rf3")
    assert rf3.config["provenance"]["rectified"] == 3
    _, meta = load_pairs(tmp_path / "rf3" / "pairs.safetensors")
    assert meta["recipe"] == {"sampler": "euler", "steps": 4, "schedule": "flow", "sigma_max": 80.0}
    # and a one-step generator distilled from it
    assert cli_main(["distill", "kd", "--teacher", str(tmp_path / "rf3"), "--out", str(tmp_path / "kd"),
                     "--n-pairs", "100", "--steps", "2", *common]) == 0
    assert load_model(tmp_path / "kd").is_generator
    with pytest.raises(FewstepError, match="sigma_min"):
        Reflow.create(ReflowConfig(sigma_min=100.0), teacher=teacher, init=init)


def test_eval_reports_straightness_and_refuses_it_for_a_one_step_generator(tmp_path, capsys):
    assert cli_main(["eval", "mixture:ring8", "--n", "200", "--steps", "4", "--straightness", "20"]) == 0
    r = json.loads(capsys.readouterr().out)
    s = r["straightness"]
    assert s["steps"] == 20 and s["n"] == 200 and s["sigma_max"] == 80.0 and 0.1 < s["relative"] < 2
    # the same number as the function on the same noise
    from fewstep.diffusion.samplers import initial_noise
    want = straightness(load_model("mixture:ring8").denoiser, initial_noise((200, 2), 0), steps=20)
    assert s["straightness"] == pytest.approx(want["straightness"], rel=1e-6)
    teacher = load_model("mixture:ring8")
    gen = init_model(teacher)
    save_model(tmp_path / "gen", gen.denoiser, {**gen.config, "type": "generator",
                                                 "sampling": {"sampler": "one-step", "sigma_init": 2.5}})
    capsys.readouterr()
    assert cli_main(["eval", str(tmp_path / "gen"), "--n", "50", "--straightness", "10"]) == 2
    assert "one-step generator has no sampling trajectory" in capsys.readouterr().err


def test_a_killed_reflow_run_resumes_exactly_on_its_pairs(tmp_path):
    teacher = load_model("mixture:ring8")
    pairs = tmp_path / "pairs.safetensors"

    def make():
        torch.manual_seed(0)
        return Reflow.create(ReflowConfig(n_pairs=300, chunk=100, steps=4, pairs=str(pairs), lr=1e-3),
                             teacher=teacher, init=init_model(teacher, {**NET, "dropout": 0.1}))
    cfg = _cfg(total_kimg=1.0, checkpoint_every_kimg=0.2, ema_halflife_kimg=0.5)
    full, resumed = straight_and_resumed(make, cfg, tmp_path)
    for k, v in full.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[k], v, rtol=0, atol=0)
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for k, v in a.denoiser.state_dict().items():  # the exported EMA too
        torch.testing.assert_close(b.denoiser.state_dict()[k], v, rtol=0, atol=0)
    init = init_model(teacher, {**NET, "dropout": 0.1}).denoiser.state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in a.denoiser.state_dict().items())  # it trained


def test_the_committed_reflow_benchmark_flow_loads_and_samples():
    """benchmarks/reflow.py commits its digits 2-rectified flow for re-evaluation with `fewstep eval`."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "students" / "reflow-digits"
    flow = load_model(path)
    assert flow.sampling["schedule"] == "flow" and flow.config["provenance"]["rectified"] == 2
    for steps in (1, 4):
        res = flow.sample(8, seed=0, steps=steps)
        assert res.nfe == steps and res.x.shape == (8, 1, 8, 8) and torch.isfinite(res.x).all()


# ---- edge cases (from an independent review's surviving mutations) ----------------------------------

def test_flow_times_fill_exactly_the_range_between_the_start_and_sigma_min():
    g = torch.Generator().manual_seed(0)
    t = sample_flow_times(20000, 80.0, 0.5, generator=g)
    t0, t1 = 1 / 81, 1 / 1.5
    assert t.min() >= t0 - 1e-6 and t.max() <= t1 + 1e-6
    assert t.min() < t0 + 1e-3 and t.max() > t1 - 1e-3


def _flow_straightness(den, z, sigma_max, steps, labels=None):
    """Independent: Euler in the flow's own coordinates X_t, v = (D(X/t, (1-t)/t) - X)/(1 - t)."""
    t0 = 1 / (1 + sigma_max)
    ts = torch.linspace(t0, 1, steps + 1, dtype=torch.float64)
    X = (t0 * sigma_max * z).double()
    vs = []
    for i in range(steps):
        t = ts[i]
        s = (1 - t) / t
        d = den(X / t, torch.full((X.shape[0],), float(s), dtype=X.dtype), labels).double()
        v = (d - X) / (1 - t)
        vs.append(v)
        X = X + (ts[i + 1] - t) * v
    chord = (X - t0 * sigma_max * z.double()) / (1 - t0)
    gap = torch.stack([(chord - v).pow(2).flatten(1).mean(1) for v in vs]).mean()
    return float(gap), float(gap / chord.pow(2).flatten(1).mean(1).mean())


def test_straightness_matches_an_independent_flow_space_euler():
    den = load_model("mixture:ring8").denoiser
    z = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = straightness(den, z, sigma_max=80.0, steps=30)
    s, rel = _flow_straightness(den, z, 80.0, 30)
    assert got["straightness"] == pytest.approx(s, rel=1e-4)
    assert got["relative"] == pytest.approx(rel, rel=1e-4)


def _conditional_model(sigma_max=None):
    net, den = perturbed_conditional_denoiser(0.3)
    sampling = {"sampler": "heun", "steps": 4, "schedule": "karras"}
    if sigma_max:
        sampling["sigma_max"] = sigma_max
    return FewstepModel(den, {"format": "fewstep.model", "version": 1, "type": "denoiser", "net": net,
                              "precond": {"name": "edm", "sigma_data": 0.5},
                              "data": {"kind": "points", "sample_shape": [2], "num_classes": 3, "name": "x"},
                              "sampling": sampling})


def test_model_straightness_uses_the_recipes_sigma_max_and_the_labels():
    model = _conditional_model(sigma_max=5.0)
    got = model_straightness(model, 60, seed=2, steps=12)
    z = initial_noise((60, 2), 2, model.device)
    labels = balanced_labels(60, 3, model.device)
    with torch.no_grad():
        want, _ = _flow_straightness(model.denoiser, z, 5.0, 12, labels)
    assert got["sigma_max"] == 5.0 and got["straightness"] == pytest.approx(want, rel=1e-4)


def test_reflow_of_a_class_conditional_teacher_feeds_the_pairs_labels(tmp_path):
    teacher = _conditional_model()
    m = Reflow.create(ReflowConfig(n_pairs=64, chunk=64, pairs=str(tmp_path / "p.safetensors")), teacher=teacher)
    m.batch_size = 16
    seen = []
    m.student.register_forward_pre_hook(lambda mod, args: seen.append(args[2] if len(args) > 2 else None))
    m.loss(None)
    pairs = m.ensure_pairs()
    assert "labels" in pairs and seen[-1] is not None and seen[-1].shape == (16,)


def test_reflow_of_a_diffusers_teacher_stays_in_its_table_and_exports_its_recipe(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import DDPMPipeline, DDPMScheduler
    from test_diffusers_teacher import tiny_unet

    d = tmp_path / "pipe"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
                 ).save_pretrained(d)
    teacher = load_model(d)
    lo, hi = teacher.denoiser.sigma_min, teacher.denoiser.sigma_max
    kw = dict(n_pairs=16, chunk=16, steps=2, pairs=str(tmp_path / "p.safetensors"))
    with pytest.raises(FewstepError, match="--sigma-min"):
        Reflow.create(ReflowConfig(sigma_min=lo / 2, **kw), teacher=teacher)
    m = Reflow.create(ReflowConfig(sample_steps=3, **kw), teacher=teacher)
    assert m.sigma_min == pytest.approx(lo)
    Trainer(m, _cfg(total_kimg=0.016, batch_size=8, checkpoint_every_kimg=1000, log_every_kimg=1000),
            tmp_path / "run").run_training()
    flow = load_model(tmp_path / "run")
    s = flow.sampling
    assert (s["sampler"], s["steps"], s["schedule"]) == ("euler", 3, "flow")
    assert s["sigma_max"] == pytest.approx(hi, rel=1e-6)
    assert flow.config["provenance"]["sigma_min"] == pytest.approx(lo)


def test_pairs_of_a_flow_teacher_are_not_its_own_one_step_map(tmp_path):
    """kd / reflow on a reflow run without --steps would take the flow's own 1-step Euler recipe for the pairs
    (KD's student, the flow's network, would start at zero loss): refused, naming --steps."""
    teacher = load_model("mixture:ring8")
    m = Reflow.create(ReflowConfig(n_pairs=50, chunk=50), teacher=teacher, init=init_model(teacher))
    Trainer(m, _cfg(total_kimg=0.1, batch_size=50, checkpoint_every_kimg=1000, log_every_kimg=1000),
            tmp_path / "rf").run_training()
    flow = load_model(tmp_path / "rf")
    for method, cfg in ((KnowledgeDistillation, KDConfig), (Reflow, ReflowConfig)):
        with pytest.raises(FewstepError, match="--steps"):
            method.create(cfg(n_pairs=16, pairs=str(tmp_path / "p.safetensors")), teacher=flow)
