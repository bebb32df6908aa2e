"""Consistency training (DESIGN §3, CT and iCT): the N curricula and the target's μ against the reference's
formulas, iCT's pair law and weighting, the identity CT is built on (its target point is an unbiased Euler
step of the probability-flow ODE with the data's exact denoiser, checked on the exact mixture of DESIGN §2),
shared dropout masks, the method's start, curriculum and target, exact resume, the CLI and a trained student."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.cli import main as cli_main
from fewstep.data import load_dataset
from fewstep.diffusion.consistency import ConsistencyDenoiser
from fewstep.diffusion.denoiser import EDMPrecond
from fewstep.diffusion.mixture import GaussianMixture
from fewstep.errors import FewstepError
from fewstep.methods.cd import cd_sigmas, teacher_ode_step
from fewstep.methods.ct import (CTConfig, ConsistencyTraining, consistency_training_loss, ct_index_probs,
                                ct_num_scales, ct_target_decay, ct_weight)
from fewstep.model import load_model
from fewstep.nets.build import build_net

from step_helpers import (NET, assert_cli_samples_at_steps, init_model, ring8_cli_args, ring8_one_step_map_errors,
                          straight_and_resumed, train_config)


class Identity(nn.Module):
    def forward(self, x, sigma, labels=None):
        return x


# ---------------------------------------------------------------------------------------------
# the curricula, against the papers' and the reference's formulas
# ---------------------------------------------------------------------------------------------

def _reference_sqrt(step, total_steps, s0, s1, mu0):
    """openai/consistency_models, create_ema_and_scales_fn(target_ema_mode="adaptive", scale_mode="progressive")."""
    scales = np.ceil(np.sqrt((step / total_steps) * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1).astype(np.int32)
    scales = np.maximum(scales, 1)
    c = -np.log(mu0) * s0
    target_ema = np.exp(-c / scales)
    return float(target_ema), int(scales + 1)


def test_the_doubling_curriculum_is_icts():
    # iCT (s0 10, s1 1280): log2(128) + 1 = 8 stages of K/8, N = 11, 21, 41, …, 1281, and 1281 after K
    K = 80.0
    assert [ct_num_scales(k, K) for k in (0, 9.99, 10, 19.99, 20, 69.9, 70, 80, 500)] == \
        [11, 11, 21, 21, 41, 641, 1281, 1281, 1281]
    # the paper's formula with integer iterations (K = 800k, K' = ⌊K/8⌋ = 100k), read in kimg
    for it in range(0, 800_001, 25_000):
        assert ct_num_scales(it / 1000, 800.0) == min(10 * 2 ** (it // 100_000), 1280) + 1
    # s0 = s1: a fixed grid of s1 + 1 points
    assert {ct_num_scales(k, 10.0, s0=17, s1=17) for k in (0, 5, 10, 20)} == {18}
    with pytest.raises(FewstepError, match="curriculum"):
        ct_num_scales(0, 1.0, "linear")
    with pytest.raises(FewstepError, match="s0"):
        ct_num_scales(0, 1.0, s0=20, s1=10)


def test_the_sqrt_curriculum_and_its_adaptive_target_are_the_references():
    K, s0, s1, mu0 = 600.0, 2, 150, 0.9
    prev = 0
    for step in range(0, 600_001, 7_000):
        mu_ref, n_ref = _reference_sqrt(step, 600_000, s0, s1, mu0)
        n = ct_num_scales(step / 1000, K, "sqrt", s0, s1)
        assert n == n_ref and n >= prev
        assert ct_target_decay(n, mu0, s0, adaptive=True) == pytest.approx(mu_ref, rel=1e-12)
        prev = n
    assert ct_num_scales(0, K, "sqrt", s0, s1) == s0 and ct_num_scales(K, K, "sqrt", s0, s1) == s1 + 1
    assert ct_num_scales(10 * K, K, "sqrt", s0, s1) == s1 + 1  # held at its end past K
    # iCT: a constant μ (0: the target is the student), whatever N
    assert ct_target_decay(641, 0.0, 10, adaptive=False) == 0.0 and ct_target_decay(11, 0.5, 10, False) == 0.5


def test_the_pair_law_is_the_discretised_log_normal():
    sig = cd_sigmas(41).double()
    p = ct_index_probs(sig, -1.1, 2.0)
    assert p.shape == (40,) and float(p.sum()) == pytest.approx(1.0, abs=1e-12)

    def cdf(s):  # N(−1.1, 2²) in ln σ, by math.erf: a second implementation
        return 0.5 * (1 + math.erf((math.log(s) - (-1.1)) / (2.0 * math.sqrt(2))))
    mass = [cdf(float(sig[i])) - cdf(float(sig[i + 1])) for i in range(40)]
    np.testing.assert_allclose(p.numpy(), np.array(mass) / sum(mass), rtol=1e-10)
    # most of the mass sits between σ ≈ 0.01 and σ ≈ 4, as ln σ ~ N(−1.1, 2²) has it
    assert int(p.argmax()) in range(10, 35) and float(p[0]) < 0.02
    # the draws inside the loss follow it
    torch.manual_seed(0)
    x0 = torch.zeros(40_000, 2, dtype=torch.float64)
    _, info = consistency_training_loss(Identity(), Identity(), x0, sig, index_probs=p, weighting="uniform")
    freq = torch.bincount(info["index"], minlength=40).double() / 40_000
    se = (p * (1 - p) / 40_000).sqrt()
    assert float(((freq - p).abs() / se.clamp_min(1e-9)).max()) < 5.0
    # uniform by default (CT)
    _, info = consistency_training_loss(Identity(), Identity(), x0, sig, weighting="uniform")
    freq = torch.bincount(info["index"], minlength=40).double() / 40_000
    assert float((freq - 1 / 40).abs().max()) < 5 * math.sqrt(1 / 40 / 40_000)


def test_both_points_lie_on_one_noising_path_and_the_weighting():
    sig = cd_sigmas(12).double()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 11, (64,), generator=g)
    z = torch.randn(64, 3, generator=g, dtype=torch.float64)
    for weighting in ("uniform", "inverse-gap"):
        per, info = consistency_training_loss(Identity(), Identity(), x0, sig, distance="l2", weighting=weighting,
                                              index=idx, noise=z)
        s, s2 = sig[idx], sig[idx + 1]
        torch.testing.assert_close(info["x"], x0 + s[:, None] * z, rtol=0, atol=0)
        torch.testing.assert_close(info["x_next"], x0 + s2[:, None] * z, rtol=0, atol=0)
        # f = identity: d = mean((σ_n − σ_{n+1})²·z²), times λ
        d = ((s - s2)[:, None] * z).pow(2).mean(1)
        lam = 1 / (s - s2) if weighting == "inverse-gap" else torch.ones_like(s)
        torch.testing.assert_close(per, (d * lam).float(), rtol=1e-4, atol=0)  # d is taken in float32
    torch.testing.assert_close(ct_weight(torch.tensor([2.0]), torch.tensor([1.5])), torch.tensor([2.0]))
    with pytest.raises(FewstepError, match="weighting"):
        ct_weight(torch.tensor([2.0]), torch.tensor([1.5]), "snr")


# ---------------------------------------------------------------------------------------------
# the identity CT is built on, on the exact mixture teacher
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair", [(1.2, 0.9), (0.15, 0.1)])
def test_the_target_point_is_an_unbiased_euler_step_with_the_exact_denoiser(pair):
    """E[x_{n+1} | x_n] = x_n + (σ_{n+1} − σ_n)(x_n − D*(x_n, σ_n))/σ_n: the residual of CT's target point
    against the exact teacher's Euler step (CD's, by teacher_ode_step) is uncorrelated with every function of
    x_n; against the Euler step of a wrong denoiser it is not."""
    mix = GaussianMixture([0.3, 0.7], [[-0.8, 0.3], [0.6, -0.2]], [0.05, 0.1])
    exact = mix.denoiser()
    wrong = GaussianMixture([0.5, 0.5], [[-0.7, 0.3], [0.6, -0.1]], [0.05, 0.1]).denoiser()  # modes off by 0.1
    m = 200_000
    g = torch.Generator().manual_seed(3)
    x0 = mix.sample(m, generator=g, dtype=torch.float64)
    z = torch.randn(m, 2, generator=g, dtype=torch.float64)
    grid = torch.tensor(pair, dtype=torch.float64)
    idx = torch.zeros(m, dtype=torch.long)
    _, info = consistency_training_loss(Identity(), Identity(), x0, grid, index=idx, noise=z, weighting="uniform")
    xn, target = info["x"], info["x_next"]
    s, s2 = torch.full((m,), pair[0], dtype=torch.float64), torch.full((m,), pair[1], dtype=torch.float64)
    with torch.no_grad():
        d_exact = exact(xn, s)
        tests = [torch.ones(m, 1, dtype=torch.float64), xn, torch.tanh(3 * xn), d_exact,
                 (xn[:, :1] * xn[:, 1:]).expand(m, 1)]
    h = torch.cat(tests, 1)  # functions of x_n alone
    for denoiser, unbiased in ((exact, True), (wrong, False)):
        euler_point = teacher_ode_step(denoiser, xn, s, s2, solver="euler")
        r = target - euler_point  # [m, 2]
        prod = (r[:, :, None] * h[:, None, :]).reshape(m, -1)
        t = prod.mean(0) / (prod.std(0) / math.sqrt(m))
        if unbiased:
            assert float(t.abs().max()) < 4.5, t
        else:
            assert float(t.abs().max()) > 10, t
    assert float(r.var(0).min()) > 1e-4  # the estimate is noisy: the residual is not trivially zero


# ---------------------------------------------------------------------------------------------
# dropout masks, gradients
# ---------------------------------------------------------------------------------------------

def test_target_shares_the_students_dropout_masks_and_gets_no_gradient():
    student = ConsistencyDenoiser(EDMPrecond(build_net({**NET, "dropout": 0.5}, seed=0)), 0.002).train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    target = copy.deepcopy(student).requires_grad_(False)
    x0 = torch.randn(64, 2)
    same = torch.tensor([0.7, 0.7])  # both points of the pair coincide: f and its target see the same input
    per, _ = consistency_training_loss(student, target, x0, same, weighting="uniform")
    assert float(per.detach().abs().max()) == 0.0
    with torch.no_grad():
        assert (student(x0, same[:1].expand(64)) - target(x0, same[:1].expand(64))).abs().max() > 0.01
    per, _ = consistency_training_loss(student, target, x0, cd_sigmas(8))
    per.mean().backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in target.parameters())


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------

def test_the_student_starts_from_the_teachers_weights_or_from_scratch_and_no_teacher_is_kept():
    teacher = load_model("shipped:digits")
    m = ConsistencyTraining.create(CTConfig(), teacher=teacher)
    assert m.frozen == {} and m.teacher is None and set(m.nets) == {"student", "target"}
    for k, v in teacher.denoiser.state_dict().items():
        assert torch.equal(m.student.inner.state_dict()[k], v)
    torch.manual_seed(0)
    fresh = ConsistencyTraining.create(CTConfig(from_scratch=True, dropout=0.3), teacher=teacher)
    sd = fresh.student.inner.state_dict()
    assert sd.keys() == teacher.denoiser.state_dict().keys()
    assert any(not torch.equal(sd[k], v) for k, v in teacher.denoiser.state_dict().items() if v.is_floating_point())
    assert {mod.p for mod in fresh.student.modules() if isinstance(mod, nn.Dropout)} == {0.3}
    with pytest.raises(FewstepError, match="--init"):
        ConsistencyTraining.create(CTConfig(), teacher=load_model("mixture:ring8"))


def test_curriculum_target_and_exact_resume(tmp_path):
    teacher = load_model("mixture:ring8")
    ds = load_dataset("mixture:ring8", n=2000)

    def make(**kw):
        torch.manual_seed(0)
        cfg = CTConfig(s0=4, s1=16, curriculum_kimg=0.8, lr=1e-3, **kw)
        return ConsistencyTraining.create(cfg, teacher=teacher, init=init_model(teacher, {**NET, "dropout": 0.1}))

    # iCT: μ = 0, the target is the student after every step; N doubles through the stages
    m = make()
    m.optimizers = m.build_optimizers()
    m.begin_iteration(0, 2000)
    assert m.num_scales == 5 and m.sigmas.shape == (5,) and m.index_probs.shape == (4,)
    loss, stats = m.loss((ds.x[:100], None))
    assert stats == {"num_scales": 5, "target_decay": 0.0}
    loss.backward()
    m.optimizers["student"].step()
    m.end_iteration(100)
    for k, v in m.student.state_dict().items():
        assert torch.equal(m.target.state_dict()[k], v)
    m.begin_iteration(500, 2000)  # stage ⌊0.5/(0.8/3)⌋ = 1: N = 9
    assert m.num_scales == 9 and float(m.sigmas[0]) == pytest.approx(80.0)
    m.begin_iteration(5000, 6000)
    assert m.num_scales == 17
    # CT's adaptive μ, applied by end_iteration
    a = make(curriculum="sqrt", target_decay=0.9, adaptive_decay=True, index="uniform", weighting="uniform")
    a.begin_iteration(400, 2000)
    n = ct_num_scales(0.4, 0.8, "sqrt", 4, 16)
    assert a.num_scales == n and a.index_probs is None and a.mu == pytest.approx(0.9 ** (4 / (n - 1)))
    old = {k: v.clone() for k, v in a.target.state_dict().items()}
    with torch.no_grad():
        for p in a.student.parameters():
            p.add_(0.01)
    a.end_iteration(400)
    for k, v in a.student.state_dict().items():
        torch.testing.assert_close(a.target.state_dict()[k], a.mu * old[k] + (1 - a.mu) * v)
    # curriculum_kimg 0: the run's --total-kimg (the loop's total_nimg)
    z = make()
    z.config.curriculum_kimg = 0.0
    z.begin_iteration(1100, 3000)  # stage ⌊1.1/(3/3)⌋ = 1
    assert z.num_scales == 9

    cfg = train_config(total_kimg=1.0, checkpoint_every_kimg=0.2, ema_halflife_kimg=0.5)
    full, resumed = straight_and_resumed(make, cfg, tmp_path, ds)  # crosses two stages after the kill
    for name in ("student", "target"):
        for k, v in full.nets[name].state_dict().items():
            torch.testing.assert_close(resumed.nets[name].state_dict()[k], v, rtol=0, atol=0)
    stats = [json.loads(line) for line in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    grids = [s["num_scales"] for s in stats if "num_scales" in s]  # window means of N: 5, then 9, then 17
    assert 5 <= grids[0] < 9 < grids[-1] <= 17 and grids == sorted(grids)
    a_model, b_model = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert isinstance(a_model.denoiser, ConsistencyDenoiser) and a_model.sampling["sampler"] == "consistency"
    assert a_model.config["provenance"]["method"] == "ct" and a_model.nfe(steps=2) == 2
    assert torch.equal(a_model.sample(32, seed=1).x, b_model.sample(32, seed=1).x)


def test_cli_ct_then_sample_in_one_and_two_steps_and_bad_options(tmp_path, capsys):
    common = ring8_cli_args(tmp_path)
    assert cli_main(["distill", "ct", "--out", str(tmp_path / "ct"), "--s0", "3", "--s1", "12",
                     "--curriculum-kimg", "0", *common]) == 0
    assert_cli_samples_at_steps(tmp_path / "ct", tmp_path, capsys)
    run_cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert run_cfg["method"] == "ct" and run_cfg["method_config"]["s1"] == 12
    assert CTConfig(**{**run_cfg["method_config"], "betas": tuple(run_cfg["method_config"]["betas"])}) == \
        CTConfig(s0=3, s1=12, curriculum_kimg=0.0)
    # CT's recipe, from the command line
    assert cli_main(["distill", "ct", "--out", str(tmp_path / "ct2"), "--curriculum", "sqrt", "--s0", "2",
                     "--s1", "20", "--index", "uniform", "--weighting", "uniform", "--target-decay", "0.9",
                     "--adaptive-decay", "--distance", "l2", *common]) == 0
    stats = [json.loads(line) for line in (tmp_path / "ct2" / "stats.jsonl").read_text().splitlines()]
    assert 0 < stats[-1]["target_decay"] < 0.9
    for bad, msg in ((dict(s0=20, s1=10), "s0"), (dict(curriculum="linear"), "curriculum"),
                     (dict(adaptive_decay=True), "--target-decay"), (dict(index="beta"), "index"),
                     (dict(weighting="snr"), "weighting"), (dict(dropout=1.0), "dropout"),
                     (dict(curriculum_kimg=-1.0), "curriculum_kimg")):
        with pytest.raises(FewstepError, match=msg):
            CTConfig(**bad).validate()


def test_ct_student_approaches_the_teachers_ode_map(tmp_path):
    """Trained on ring8 samples alone from an untrained network (no teacher evaluated), the one-step
    consistency model maps noise close to where the exact teacher's 35-NFE Heun sampler takes it: far closer
    than the exact teacher's own single denoising step does."""
    teacher = load_model("mixture:ring8")
    torch.manual_seed(0)
    m = ConsistencyTraining.create(CTConfig(lr=2e-3, curriculum_kimg=60.0, s0=10, s1=160), teacher=teacher,
                                   init=init_model(teacher, {**NET, "width": 64}))
    err, one = ring8_one_step_map_errors(m, tmp_path)
    assert err < 0.25 * one, (err, one)  # measured: 0.108 against 0.720 (CD's test: 0.127)



def test_the_committed_ct_benchmark_student_loads_and_samples():
    """benchmarks/ct.py commits its digits student for re-evaluation with `fewstep eval`."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "students" / "ct-digits"
    student = load_model(path)
    assert isinstance(student.denoiser, ConsistencyDenoiser) and student.config["provenance"]["method"] == "ct"
    for steps in (1, 4):
        res = student.sample(8, seed=0, steps=steps)
        assert res.nfe == steps and res.x.shape == (8, 1, 8, 8) and torch.isfinite(res.x).all()
