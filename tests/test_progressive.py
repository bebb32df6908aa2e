"""Progressive distillation (DESIGN §3, seed 001): the DDIM target identity in σ- and z-space,
the weightings, the clipped cosine grid, stages, resume, and a student that reproduces its
exact mixture teacher's few-step samples."""
import json
import math

import pytest
import torch

from fewstep.cli import main as cli_main
from fewstep.data import load_dataset
from fewstep.diffusion.conversions import VPDenoiser, cosine_alpha_sigma, cosine_t
from fewstep.diffusion.denoiser import EDMPrecond
from fewstep.diffusion.samplers import ddim, make_sigmas
from fewstep.errors import FewstepError
from fewstep.methods.progressive import (Progressive, ProgressiveConfig, halving_schedule, progressive_loss,
                                         progressive_target)
from fewstep.methods.step_distill import (ddim_step, ddim_step_z, distill_target, distill_target_z, loss_weight,
                                          sampling_recipe, step_distill_loss, step_sigmas, x0_to_v_sigma)
from fewstep.model import load_model, save_model
from fewstep.nets.build import build_net
from fewstep.nets.two_head import two_head_from
from fewstep.training.loop import Trainer

from step_helpers import NET, init_model, three_mode_mixture as _mix, train_config as _cfg  # noqa: F401


# ---------------------------------------------------------------------------------------------
# the target identity
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_student,i", [(1, 0), (4, 0), (4, 2), (4, 3), (64, 40)])
def test_one_student_step_with_target_lands_on_teachers_two_steps(n_student, i):
    """σ-space and z-space: DDIM from z_t with x̂ = x̃ lands exactly on the teacher's z_t''."""
    teacher = _mix().denoiser()
    g = torch.Generator().manual_seed(i)
    x0 = _mix().sample(256, generator=g)
    s = step_sigmas(n_student).double()
    s2 = step_sigmas(2 * n_student).double()
    sig, mid, nxt = s[i], s2[2 * i + 1], s[i + 1]
    assert sig > mid > nxt
    x = x0 + sig * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # σ-space: two teacher steps, one student step with x̂ = x̃
    xa = teacher(x, sig)
    x_mid = ddim_step(x, xa, sig, mid)
    xb = teacher(x_mid, mid)
    x_next = ddim_step(x_mid, xb, mid, nxt)
    target = distill_target(x, x_next, sig, nxt)
    torch.testing.assert_close(ddim_step(x, target, sig, nxt), x_next, rtol=0, atol=1e-12)
    # the σ-space step is the sampler's DDIM step
    one = ddim(teacher, x, torch.stack([sig, mid]))
    torch.testing.assert_close(one.x, x_mid, rtol=0, atol=1e-12)
    # z-space with the cosine schedule: z = α·x, same teacher x̂'s, DESIGN's formula
    t = [cosine_t(v) for v in (sig, mid, nxt)]
    (a, st), (am, sm), (an, sn) = (cosine_alpha_sigma(v) for v in t)
    z = a * x
    z_mid = ddim_step_z(z, xa, a, st, am, sm)
    torch.testing.assert_close(z_mid, am * x_mid, rtol=0, atol=1e-12)
    z_next = ddim_step_z(z_mid, xb, am, sm, an, sn)
    target_z = distill_target_z(z, z_next, a, st, an, sn)
    torch.testing.assert_close(ddim_step_z(z, target_z, a, st, an, sn), z_next, rtol=0, atol=1e-12)
    torch.testing.assert_close(target_z, target, rtol=0, atol=1e-10)  # the same x̃ in both spaces
    # and the library function computes exactly this target
    n = x.shape[0]
    full = progressive_target(teacher, x, sig.expand(n), mid.expand(n), nxt.expand(n))
    torch.testing.assert_close(full, target, rtol=0, atol=1e-12)


def test_the_target_does_not_depend_on_the_teachers_native_parameterisation():
    """A v-prediction VP model on the cosine schedule, adapted to σ-space, gives the same x̃."""
    den = _mix().denoiser()

    def v_net(x_t, t, labels=None):  # the mixture's exact v-prediction in VP units
        a, st = (c[:, None] for c in cosine_alpha_sigma(t))
        x, sigma = x_t / a, (st / a)[:, 0]
        x0 = den(x, sigma)
        return a * (x - x0) / sigma[:, None] - st * x0
    foreign = VPDenoiser.cosine(v_net, "v_prediction")
    x = torch.randn(64, 2, dtype=torch.float64) * 2.35
    n = x.shape[0]
    s, s2 = step_sigmas(4).double(), step_sigmas(8).double()
    args = (x, s[1].expand(n), s2[3].expand(n), s[2].expand(n))
    torch.testing.assert_close(progressive_target(foreign, *args), progressive_target(den, *args),
                               rtol=0, atol=1e-9)


def test_float32_identity_to_float_precision():
    teacher = _mix().denoiser()
    x = torch.randn(512, 2) * 2.35
    n = x.shape[0]
    s, s2 = step_sigmas(4), step_sigmas(8)
    sig, mid, nxt = (v.expand(n) for v in (s[1], s2[3], s[2]))
    target = progressive_target(teacher, x, sig, mid, nxt)
    assert target.dtype == torch.float32
    x_next = ddim_step(ddim_step(x, teacher(x, sig), sig, mid), teacher(ddim_step(x, teacher(x, sig), sig, mid), mid), mid, nxt)
    torch.testing.assert_close(ddim_step(x, target, sig, nxt), x_next, rtol=1e-5, atol=1e-5)


def test_last_step_target_is_the_teachers_x_hat():
    teacher = _mix().denoiser()
    x = torch.randn(128, 2, dtype=torch.float64) * 0.9
    n = x.shape[0]
    sig = torch.full((n,), 0.9, dtype=torch.float64)
    mid = torch.full((n,), 0.3, dtype=torch.float64)
    target = progressive_target(teacher, x, sig, mid, torch.zeros(n, dtype=torch.float64))
    x_mid = ddim_step(x, teacher(x, sig), sig, mid)
    torch.testing.assert_close(target, teacher(x_mid, mid), rtol=0, atol=0)


def test_float32_target_keeps_the_teachers_precision_at_many_steps():
    """At N = 4096 the landing-point form (x'' − r·x)/(1 − r) divides the teacher's float32 rounding by
    1 − r ≈ 2π·t_max/N; the target built from the two x̂ (two_step_target) stays at float32 precision."""
    mix = _mix()
    teacher = mix.denoiser()
    g = torch.Generator().manual_seed(0)
    n, N = 4000, 4096
    idx = torch.randint(0, N, (n,), generator=g)
    s, s2 = step_sigmas(N), step_sigmas(2 * N)
    sig, mid, nxt = s[idx], s2[2 * idx + 1], s[idx + 1]
    x = (mix.sample(n, generator=g) + sig.double()[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()
    ref = progressive_target(teacher, x.double(), sig.double(), mid.double(), nxt.double())
    signal = ref - teacher(x.double(), sig.double())  # what the student learns beyond the teacher's one step
    w = loss_weight(sig.double(), "truncated-snr")[:, None]

    def noise_over_signal(t):
        return float((w * (t.double() - ref) ** 2).mean() / (w * signal ** 2).mean())

    assert noise_over_signal(progressive_target(teacher, x, sig, mid, nxt)) < 1e-4
    x_next = ddim_step(ddim_step(x, teacher(x, sig), sig, mid), teacher(ddim_step(x, teacher(x, sig), sig, mid), mid), mid, nxt)
    assert noise_over_signal(distill_target(x.double(), x_next.double(), sig.double(), nxt.double())) > 1e-2


# ---------------------------------------------------------------------------------------------
# weightings and parameterisations
# ---------------------------------------------------------------------------------------------

def test_snr_plus_one_weighting_is_the_v_mse_and_truncated_snr_the_max():
    g = torch.Generator().manual_seed(0)
    n = 64
    sigma = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 1.5)
    x0, eps = (torch.randn(n, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    x = x0 + sigma[:, None, None] * eps
    x_hat = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # v-MSE computed independently in VP units: z = α x0 + σ_t ε, v = α ε − σ_t x0
    t = cosine_t(sigma)
    a, st = cosine_alpha_sigma(t)
    a, st = a[:, None, None], st[:, None, None]
    z = a * x
    eps_hat = (z - a * x_hat) / st
    v, v_hat = a * eps - st * x0, a * eps_hat - st * x_hat
    v_mse = (v - v_hat).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(x0_to_v_sigma(x, x0, sigma), v)
    snr1 = step_distill_loss(x_hat, x0, x, sigma, weighting="snr+1", prediction="x")
    torch.testing.assert_close(snr1, v_mse)
    torch.testing.assert_close(step_distill_loss(x_hat, x0, x, sigma, weighting="snr+1", prediction="v"), v_mse)
    torch.testing.assert_close(step_distill_loss(x_hat, x0, x, sigma, weighting="auto", prediction="v"), v_mse)
    # truncated SNR: max(‖x − x̂‖², ‖ε − ε̂‖²)
    x_err = (x0 - x_hat).pow(2).flatten(1).mean(1)
    e_err = (eps - eps_hat).pow(2).flatten(1).mean(1)
    trunc = step_distill_loss(x_hat, x0, x, sigma, weighting="truncated-snr")
    torch.testing.assert_close(trunc, torch.maximum(x_err, e_err))
    torch.testing.assert_close(loss_weight(sigma, "truncated-snr"), torch.clamp(sigma**-2, min=1))


def test_two_head_student_starts_as_its_teacher_and_mixes_by_snr():
    torch.manual_seed(0)
    net = build_net(NET)
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    two = two_head_from(net)
    x, s = torch.randn(16, 2), torch.exp(torch.randn(16) * 2)
    torch.testing.assert_close(EDMPrecond(two)(x, s), EDMPrecond(net)(x, s), rtol=1e-5, atol=1e-5)
    # perturb the ε-head only: its influence is α_t² = 1/(1+σ²) (large at high SNR, ~0 at low SNR)
    c_noise = s.log() / 4
    f_x, f_e = two.heads(x, c_noise)
    out = two(x, c_noise)
    w = (s**2 / (1 + s**2))[:, None]
    torch.testing.assert_close(out, w * f_x + (1 - w) * f_e)


# ---------------------------------------------------------------------------------------------
# the grid the student is trained on is the grid it samples on
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 8, 256])
def test_step_grid_is_the_clipped_cosine_schedule(n):
    s = step_sigmas(n, 80.0).double()
    assert s.shape == (n + 1,) and s[-1] == 0
    t = cosine_t(s[:-1])
    t_max = cosine_t(torch.tensor(80.0, dtype=torch.float64))
    torch.testing.assert_close(t, t_max * torch.arange(n, 0, -1, dtype=torch.float64) / n, rtol=0, atol=1e-6)
    r = sampling_recipe(n, 80.0)
    kw = {k: v for k, v in r.items() if k in ("sigma_min", "sigma_max")}
    torch.testing.assert_close(make_sigmas("cosine", n, **kw), step_sigmas(n, 80.0), rtol=0, atol=0)
    if n > 1:  # a 2N-step teacher's grid contains the N-step student's
        torch.testing.assert_close(step_sigmas(2 * n)[::2], step_sigmas(n), rtol=1e-5, atol=0)


def test_halving_schedule_and_config_checks():
    assert halving_schedule(256, 1) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert halving_schedule(96, 3) == [96, 48, 24, 12, 6, 3]
    with pytest.raises(FewstepError, match="halve"):
        ProgressiveConfig(start_steps=12, end_steps=1).validate()
    with pytest.raises(FewstepError, match="prediction"):
        ProgressiveConfig(prediction="eps").validate()


# ---------------------------------------------------------------------------------------------
# stages inside the shared loop
# ---------------------------------------------------------------------------------------------

def _weights(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_stages_halve_the_saved_students_steps_and_switch_teachers(tmp_path):
    teacher = load_model("mixture:ring8")
    ds = load_dataset("mixture:ring8", n=2000)
    m = Progressive.create(ProgressiveConfig(start_steps=8, end_steps=2, lr=1e-3), teacher=teacher,
                           init=init_model(teacher))
    assert m.schedule == [8, 4, 2] and m.student_steps == 4
    seen = []
    orig = m.advance_stage

    def spy():
        before = _weights(m.student)
        orig()
        seen.append(m.stage)
        # the student of the finished stage is now the frozen teacher and the new student's start
        for k, v in m.teacher.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        assert not any(p.requires_grad for p in m.teacher.parameters())
        assert m.optimizers["student"].state == {}  # a fresh optimiser
    m.advance_stage = spy
    run = tmp_path / "run"
    Trainer(m, _cfg(total_kimg=2.0), run, dataset=ds).run_training()
    assert seen == [1]
    for n in (4, 2):
        folder = run / "stages" / f"steps-{n}"
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["sampling"]["steps"] == n and cfg["sampling"]["sampler"] == "ddim"
        model = load_model(folder)
        res = model.sample(32, seed=0)
        assert res.nfe == n and torch.isfinite(res.x).all()
    assert load_model(run).sampling["steps"] == 2  # RUN/model is the last stage's student
    torch.testing.assert_close(load_model(run / "stages" / "steps-4").denoiser.net.state_dict()["fc_out.weight"],
                               m.teacher.net.state_dict()["fc_out.weight"], rtol=0, atol=0)
    stats = [json.loads(s) for s in (run / "stats.jsonl").read_text().splitlines()]
    assert stats[0]["student_steps"] == 4 and stats[-1]["student_steps"] == 2
    assert "stage 2 of 2: 4 → 2 steps" in (run / "log.txt").read_text()


def test_learning_rate_anneals_to_zero_within_each_stage():
    teacher = load_model("mixture:ring8")
    m = Progressive.create(ProgressiveConfig(start_steps=4, end_steps=1, lr=1e-3), teacher=teacher,
                           init=init_model(teacher))
    m.optimizers = m.build_optimizers()
    m.save_stage = lambda path=None: None
    lrs = []
    for nimg in range(0, 2000, 250):
        m.begin_iteration(nimg, 2000)
        lrs.append((m.stage, m.optimizers["student"].param_groups[0]["lr"]))
    assert [s for s, _ in lrs] == [0] * 4 + [1] * 4
    assert lrs[0][1] == pytest.approx(1e-3) and lrs[3][1] == pytest.approx(0.25e-3)
    assert lrs[4][1] == pytest.approx(1e-3) and lrs[7][1] == pytest.approx(0.25e-3)


def test_killed_run_resumes_in_the_right_stage_exactly(tmp_path):
    teacher = load_model("mixture:ring8")
    ds = load_dataset("mixture:ring8", n=2000)

    def make():
        torch.manual_seed(0)
        return Progressive.create(ProgressiveConfig(start_steps=4, end_steps=1, lr=1e-3), teacher=teacher,
                                  init=init_model(teacher))
    cfg = _cfg(total_kimg=2.0, checkpoint_every_kimg=0.2)
    full = make()
    Trainer(full, cfg, tmp_path / "a", dataset=ds).run_training()
    part = make()
    Trainer(part, cfg, tmp_path / "b", dataset=ds).run_training(max_iterations=13)  # stage 1, between checkpoints
    assert part.stage == 1
    # a longer --total-kimg would put 1.3 kimg back in stage 0, which the saved stage-1 state cannot be
    with pytest.raises(FewstepError, match="resume with the --total-kimg"):
        Trainer(make(), _cfg(total_kimg=4.0, checkpoint_every_kimg=0.2), tmp_path / "b", dataset=ds).run_training()
    resumed = make()
    Trainer(resumed, cfg, tmp_path / "b", dataset=ds).run_training()
    assert resumed.stage == 1
    for k, v in full.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[k], v, rtol=0, atol=0)
    for k, v in full.teacher.state_dict().items():
        torch.testing.assert_close(resumed.teacher.state_dict()[k], v, rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "b" / "stages").iterdir()) == ["steps-1", "steps-2"]


def test_stage_layouts_that_skip_a_stage_or_mix_stages_are_refused(tmp_path):
    teacher = load_model("mixture:ring8")
    ds = load_dataset("mixture:ring8", n=2000)

    def make(**kw):
        return Progressive.create(ProgressiveConfig(start_steps=8, end_steps=1, lr=1e-3, **kw), teacher=teacher,
                                  init=init_model(teacher))
    # 3 stages of 1 kimg in 2 kimg: the 2 → 1 stage would never run (RUN/model would be the 2-step student)
    with pytest.raises(FewstepError, match=r"stage 3 \(2 → 1 steps\).*at least 2\.1"):
        Trainer(make(kimg_per_stage=1.0), _cfg(total_kimg=2.0), tmp_path / "a", dataset=ds).run_training()
    # stages shorter than one iteration: students that are copies of their teachers
    with pytest.raises(FewstepError, match=r"fewer than one iteration's 100.*at least 0\.3"):
        Trainer(make(), _cfg(total_kimg=0.25), tmp_path / "b", dataset=ds).run_training()
    with pytest.raises(FewstepError, match="less than one iteration.*raise it to at least 0.1"):
        Trainer(make(kimg_per_stage=0.01), _cfg(total_kimg=10.0), tmp_path / "d", dataset=ds).run_training()
    # the loop's EMA would average students of different step counts
    with pytest.raises(FewstepError, match="ema-residual"):
        Trainer(make(), _cfg(ema_halflife_kimg=1.0), tmp_path / "c", dataset=ds).run_training()
    assert not (tmp_path / "a" / "stages").exists() and not (tmp_path / "c" / "stages").exists()


# ---------------------------------------------------------------------------------------------
# it works: a one-stage student reproduces its exact teacher's few-step samples
# ---------------------------------------------------------------------------------------------

def test_one_stage_student_reproduces_the_mixture_teachers_two_step_samples(tmp_path):
    teacher = load_model("mixture:ring8")
    ds = load_dataset("mixture:ring8", n=4000)
    torch.manual_seed(0)
    m = Progressive.create(ProgressiveConfig(start_steps=2, end_steps=1, lr=1e-3), teacher=teacher,
                           init=init_model(teacher, {**NET, "width": 64}))
    Trainer(m, _cfg(total_kimg=20.0, batch_size=256, checkpoint_every_kimg=100, log_every_kimg=100),
            tmp_path / "run", dataset=ds).run_training()
    student = load_model(tmp_path / "run" / "stages" / "steps-1")
    kw = {k: v for k, v in sampling_recipe(2).items() if k in ("sigma_min", "sigma_max")}
    t2 = teacher.sample(2000, seed=3, sampler="ddim", steps=2, schedule="cosine", **kw).x
    t1 = teacher.sample(2000, seed=3, sampler="ddim", steps=1, schedule="cosine", sigma_max=80.0).x
    s1 = student.sample(2000, seed=3).x
    assert student.nfe() == 1
    err = (s1 - t2).norm(dim=1).mean()
    fewer = (t1 - t2).norm(dim=1).mean()  # what simply taking fewer teacher steps gives
    print("student-vs-teacher", float(err), "fewer-steps", float(fewer))
    assert err < 0.05 and err < 0.2 * fewer, (err, fewer)


def test_cli_progressive_run_folder_and_sample_each_stage(tmp_path, capsys):
    teacher = load_model("mixture:ring8")
    init = init_model(teacher)
    save_model(tmp_path / "init", init.denoiser, init.config)
    run = tmp_path / "run"
    rc = cli_main(["distill", "progressive", "--teacher", "mixture:ring8", "--init", str(tmp_path / "init"),
                   "--data", "mixture:ring8", "--out", str(run), "--start-steps", "4", "--lr", "1e-3",
                   "--prediction", "v", "--total-kimg", "0.8", "--batch-size", "100", "--no-progress",
                   "--snapshot-every-kimg", "100", "--checkpoint-every-kimg", "100"])
    assert rc == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "progressive" and cfg["train"]["grad_clip"] == 1.0 and cfg["train"]["ema_halflife_kimg"] == 0
    for n in (2, 1):
        out = tmp_path / f"s{n}.npy"
        assert cli_main(["sample", str(run / "stages" / f"steps-{n}"), "--n", "16", "--out", str(out)]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["nfe"] == n


def test_progressive_loss_is_differentiable_and_both_heads_run(tmp_path):
    teacher = load_model("mixture:ring8")
    m = Progressive.create(ProgressiveConfig(start_steps=4, prediction="both"), teacher=teacher,
                           init=init_model(teacher))
    x0 = teacher.sample(32, seed=0).x
    per, info = progressive_loss(m.student, m.teacher, x0, 2)
    per.mean().backward()
    assert per.shape == (32,) and all(p.grad is not None for p in m.student.parameters())
    assert not info["target"].requires_grad
    assert m.export_config()["net"]["name"] == "two-head"
    save_model(tmp_path / "both", m.student, m.export_config())  # a two-head student loads like any model
    back = load_model(tmp_path / "both")
    x, s = torch.randn(8, 2), torch.rand(8) + 0.1
    torch.testing.assert_close(back.denoiser(x, s), m.student(x, s), rtol=0, atol=0)
    assert math.isfinite(float(per.detach().mean()))
