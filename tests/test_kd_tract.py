"""TRACT and Luhman-style knowledge distillation (DESIGN §3): TRACT's bootstrapped target, its
phases and self-teacher, resumable teacher-pair generation, and students that match their
exact mixture teacher."""
import json

import pytest
import torch

from fewstep.cli import main as cli_main
from fewstep.data import load_dataset
from fewstep.diffusion.samplers import heun, make_sigmas
from fewstep.errors import FewstepError
from fewstep.methods import kd as kd_mod
from fewstep.methods.kd import KDConfig, KnowledgeDistillation, generate_pairs, kd_loss, load_pairs
from fewstep.methods.progressive import progressive_target
from fewstep.methods.step_distill import ddim_step, sampling_recipe, step_sigmas
from fewstep.methods.tract import TRACT, TRACTConfig, tract_indices, tract_loss, tract_target
from fewstep.model import load_model, one_step_generate, save_model
from fewstep.training.loop import Trainer

from step_helpers import NET, init_model, three_mode_mixture as _mix, train_config as _cfg  # noqa: F401


# ---------------------------------------------------------------------------------------------
# TRACT
# ---------------------------------------------------------------------------------------------

def test_tract_indices_split_the_teacher_grid_into_intervals():
    j = torch.arange(1, 9)
    p, p_next, q, at_b = tract_indices(8, 2, j)
    assert p.tolist() == [7, 6, 5, 4, 3, 2, 1, 0] and (p_next == p + 1).all()
    # intervals (0, 4] and (4, 8] of the 8-grid; lower boundaries t = 0 (S-grid position 2) and t = 4/8 (position 1)
    assert q.tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert at_b.tolist() == [True, False, False, False, True, False, False, False]


def test_tract_target_lands_on_the_bootstrapped_boundary_point():
    teacher, self_teacher = _mix().denoiser(), _mix(0.1).denoiser()
    g = torch.Generator().manual_seed(0)
    T, S = 8, 2
    j = torch.randint(1, T + 1, (400,), generator=g)
    p, p_next, q, at_b = tract_indices(T, S, j)
    st, ss = step_sigmas(T).double(), step_sigmas(S).double()
    sig, sig_t, sig_b = st[p], st[p_next], ss[q]
    x = _mix().sample(400, generator=g) + sig[:, None] * torch.randn(400, 2, generator=g, dtype=torch.float64)
    target = tract_target(teacher, self_teacher, x, sig, sig_t, sig_b, at_b)
    x1 = ddim_step(x, teacher(x, sig), sig, sig_t)
    x_b = torch.where(at_b[:, None], x1, ddim_step(x1, self_teacher(x1, sig_t), sig_t, sig_b))
    torch.testing.assert_close(ddim_step(x, target, sig, sig_b), x_b, rtol=0, atol=1e-10)
    assert at_b.any() and (~at_b).any()


def test_tract_with_two_to_one_intervals_and_the_teacher_as_self_teacher_is_progressive():
    teacher = _mix().denoiser()
    x = torch.randn(64, 2, dtype=torch.float64)
    T, S = 8, 4
    j = torch.full((64,), 6)  # top of the interval (4/8, 6/8]: one teacher step, then one more
    p, p_next, q, at_b = tract_indices(T, S, j)
    st, ss = step_sigmas(T).double(), step_sigmas(S).double()
    sig, sig_t, sig_b = st[p], st[p_next], ss[q]
    x = x * sig[:, None]
    a = tract_target(teacher, teacher, x, sig, sig_t, sig_b, at_b)
    b = progressive_target(teacher, x, sig, sig_t, sig_b)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_tract_phases_self_teacher_and_exact_resume(tmp_path):
    teacher = load_model("mixture:ring8")
    ds = load_dataset("mixture:ring8", n=2000)

    def make():
        torch.manual_seed(0)
        return TRACT.create(TRACTConfig(intervals=[4, 2, 1], lr=1e-3, self_teacher_decay=0.5), teacher=teacher,
                            init=init_model(teacher))
    m = make()
    assert m.ema_net == "student_ema" and set(m.nets) == {"student", "student_ema", "self_teacher"}
    # one iteration by hand: the self-teacher is the 0.5-EMA of the student
    m.optimizers = m.build_optimizers()
    m.batch_size = 100
    old = {k: v.clone() for k, v in m.self_teacher.state_dict().items()}
    m.begin_iteration(0, 2000)
    loss, _ = m.loss((ds.x[:100], None))
    loss.backward()
    m.optimizers["student"].step()
    m.end_iteration(0)
    for k, v in m.student.state_dict().items():
        torch.testing.assert_close(m.self_teacher.state_dict()[k], 0.5 * old[k] + 0.5 * v)

    cfg = _cfg(total_kimg=2.0, checkpoint_every_kimg=0.2)
    full = make()
    Trainer(full, cfg, tmp_path / "a", dataset=ds).run_training()
    part = make()
    Trainer(part, cfg, tmp_path / "b", dataset=ds).run_training(max_iterations=13)
    assert part.stage == 1 and part.teacher_steps == 2 and part.student_steps == 1
    resumed = make()
    Trainer(resumed, cfg, tmp_path / "b", dataset=ds).run_training()
    for name in ("student", "student_ema", "self_teacher"):
        for k, v in full.nets[name].state_dict().items():
            torch.testing.assert_close(resumed.nets[name].state_dict()[k], v, rtol=0, atol=0)
    for k, v in full.teacher.state_dict().items():
        torch.testing.assert_close(resumed.teacher.state_dict()[k], v, rtol=0, atol=0)
    run = tmp_path / "b"
    for n in (2, 1):
        model = load_model(run / "stages" / f"steps-{n}")
        assert model.sampling["steps"] == n and model.sample(8, seed=0).nfe == n
    # the exported student is the per-phase EMA
    exported = load_model(run).denoiser.net.state_dict()
    for k, v in resumed.nets["student_ema"].net.state_dict().items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0)


def test_one_phase_tract_student_reproduces_the_mixture_teachers_samples(tmp_path):
    teacher = load_model("mixture:ring8")
    ds = load_dataset("mixture:ring8", n=4000)
    torch.manual_seed(0)
    m = TRACT.create(TRACTConfig(intervals=[8, 1], lr=3e-3, ema_residual=0.0), teacher=teacher,
                     init=init_model(teacher, {**NET, "width": 64}))
    Trainer(m, _cfg(total_kimg=60.0, batch_size=256, checkpoint_every_kimg=1000, log_every_kimg=1000),
            tmp_path / "run", dataset=ds).run_training()
    stats = [json.loads(s) for s in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert 0.7 < stats[-1]["bootstrapped"] < 0.95  # 7 of 8 teacher points need the self-teacher
    student = load_model(tmp_path / "run")
    kw = lambda n: {k: v for k, v in sampling_recipe(n).items() if k in ("sigma_min", "sigma_max")}  # noqa: E731
    t8 = teacher.sample(2000, seed=3, sampler="ddim", steps=8, schedule="cosine", **kw(8)).x
    t1 = teacher.sample(2000, seed=3, sampler="ddim", steps=1, schedule="cosine", **kw(1)).x
    s1 = student.sample(2000, seed=3).x
    err, fewer = (s1 - t8).norm(dim=1).mean(), (t1 - t8).norm(dim=1).mean()
    assert err < 0.15 and err < 0.25 * fewer, (err, fewer)


def test_tract_config_checks():
    with pytest.raises(FewstepError, match="divide"):
        TRACTConfig(intervals=[1024, 48, 1]).validate()
    with pytest.raises(FewstepError, match="at least one"):
        TRACTConfig(intervals=[8]).validate()
    with pytest.raises(ValueError):
        tract_loss(None, None, None, torch.zeros(2, 2), 8, 3)


# ---------------------------------------------------------------------------------------------
# knowledge distillation
# ---------------------------------------------------------------------------------------------

def test_pairs_are_teacher_ode_samples_of_their_noise(tmp_path):
    teacher = load_model("mixture:ring8")
    path = generate_pairs(teacher, tmp_path / "pairs.safetensors", 30, steps=6, chunk=8, seed=1)
    t, meta = load_pairs(path)
    assert t["noise"].shape == (30, 2) and t["x"].shape == (30, 2) and "labels" not in t
    assert meta["recipe"] == {"sampler": "heun", "steps": 6, "schedule": "karras"} and meta["sigma_init"] == 80.0
    sig = make_sigmas("karras", 6)
    torch.testing.assert_close(t["x"], heun(teacher.denoiser, t["noise"] * sig[0], sig).x, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "pairs.safetensors.parts").exists()
    # reused as is; other settings are refused
    assert generate_pairs(teacher, path, 30, steps=6, chunk=8, seed=1) == path
    with pytest.raises(FewstepError, match="other settings"):
        generate_pairs(teacher, path, 30, steps=7, chunk=8, seed=1)
    with pytest.raises(FewstepError, match="teacher_hash"):  # another teacher of the same shapes and recipe
        generate_pairs(load_model("mixture:grid25"), path, 30, steps=6, chunk=8, seed=1)
    with pytest.raises(FewstepError, match="deterministic ODE sampler"):
        generate_pairs(teacher, tmp_path / "p2.safetensors", 30, sampler="one-step")


def test_killed_pair_generation_resumes_to_the_same_file(tmp_path, monkeypatch):
    teacher = load_model("mixture:ring8")
    ref = generate_pairs(teacher, tmp_path / "ref.safetensors", 50, steps=4, chunk=10, seed=2)
    calls = []
    real = kd_mod.generate_pair_chunk

    def dies_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(a[6])
        return real(*a, **k)
    monkeypatch.setattr(kd_mod, "generate_pair_chunk", dies_after_two)
    path = tmp_path / "run" / "pairs.safetensors"
    with pytest.raises(KeyboardInterrupt):
        generate_pairs(teacher, path, 50, steps=4, chunk=10, seed=2)
    parts = sorted(p.name for p in (tmp_path / "run" / "pairs.safetensors.parts").glob("chunk-*"))
    assert parts == ["chunk-000000.safetensors", "chunk-000001.safetensors"] and not path.exists()
    monkeypatch.setattr(kd_mod, "generate_pair_chunk", lambda *a, **k: (calls.append(a[6]), real(*a, **k))[1])
    generate_pairs(teacher, path, 50, steps=4, chunk=10, seed=2)
    assert calls == [0, 1, 2, 3, 4]  # only the missing chunks were made
    a, _ = load_pairs(ref)
    b, _ = load_pairs(path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_kd_student_reproduces_the_teachers_ode_map(tmp_path):
    teacher = load_model("mixture:ring8")
    torch.manual_seed(0)
    m = KnowledgeDistillation.create(KDConfig(n_pairs=4000, chunk=1000, lr=3e-3), teacher=teacher,
                                     init=init_model(teacher, {**NET, "width": 64}))
    Trainer(m, _cfg(total_kimg=60.0, batch_size=256, ema_halflife_kimg=0, checkpoint_every_kimg=1000,
                    log_every_kimg=1000), tmp_path / "run").run_training()
    assert (tmp_path / "run" / "pairs.safetensors").is_file()
    student = load_model(tmp_path / "run")
    assert student.is_generator and student.nfe() == 1 and student.sampling["sigma_init"] == 80.0
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))  # fresh noise, not the pairs'
    sig = make_sigmas("karras", 18)
    x_teacher = heun(teacher.denoiser, z * sig[0], sig).x
    with torch.no_grad():
        x_student = one_step_generate(student.denoiser, z, 80.0)
        x_one = one_step_generate(teacher.denoiser, z, 80.0)  # the teacher's own single step
        per = kd_loss(student.denoiser, z, x_teacher, 80.0)
    err, one = (x_student - x_teacher).norm(dim=1).mean(), (x_one - x_teacher).norm(dim=1).mean()
    assert per.shape == (2000,)
    assert err < 0.15 and err < 0.2 * one, (err, one)


def test_cli_kd_and_tract(tmp_path, capsys):
    teacher = load_model("mixture:ring8")
    init = init_model(teacher)
    save_model(tmp_path / "init", init.denoiser, init.config)
    common = ["--teacher", "mixture:ring8", "--init", str(tmp_path / "init"), "--total-kimg", "0.4",
              "--batch-size", "100", "--no-progress", "--snapshot-every-kimg", "100", "--checkpoint-every-kimg", "100"]
    assert cli_main(["distill", "kd", "--out", str(tmp_path / "kd"), "--n-pairs", "120", "--chunk", "50",
                     "--steps", "5", *common]) == 0
    assert load_pairs(tmp_path / "kd" / "pairs.safetensors")[0]["x"].shape == (120, 2)
    assert cli_main(["sample", str(tmp_path / "kd"), "--n", "16", "--out", str(tmp_path / "kd.npy")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nfe"] == 1
    assert cli_main(["distill", "tract", "--out", str(tmp_path / "tract"), "--data", "mixture:ring8",
                     "--intervals", "8,2,1", *common]) == 0
    assert cli_main(["sample", str(tmp_path / "tract" / "stages" / "steps-2"), "--n", "16",
                     "--out", str(tmp_path / "t.npy")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nfe"] == 2
    # a foreign or exact teacher without --init is a clear error
    with pytest.raises(FewstepError, match="--init"):
        KnowledgeDistillation.create(KDConfig(), teacher=teacher)
