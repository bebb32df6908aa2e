"""Consistency distillation (DESIGN §3): the boundary-condition parameterisation, the teacher's ODE
step against fewstep's Heun/Euler samplers, the loss at the exact consistency function of Gaussian
and mixture teachers, the target network, the multistep sampler, checkpoints and the CLI."""
import copy
import json

import pytest
import torch
from torch import nn

from fewstep.cli import main as cli_main
from fewstep.data import load_dataset
from fewstep.diffusion.consistency import ConsistencyDenoiser, consistency_scalings
from fewstep.diffusion.denoiser import EDMPrecond, append_dims, edm_scalings
from fewstep.diffusion.mixture import GaussianMixture
from fewstep.diffusion.samplers import consistency_sigmas, euler, heun, initial_noise, make_sigmas
from fewstep.errors import FewstepError
from fewstep.methods.cd import (CDConfig, ConsistencyDistillation, cd_sigmas, consistency_distance,
                                consistency_distillation_loss, pseudo_huber_c, teacher_ode_step)
from fewstep.model import load_model, save_model
from fewstep.nets.build import build_net

from step_helpers import (NET, assert_cli_samples_at_steps, init_model, ring8_cli_args, ring8_one_step_map_errors,
                          straight_and_resumed, train_config)


def _edm(seed=0, dropout=0.0):
    """A small EDM denoiser with random weights everywhere (a fresh network's last layers start at zero)."""
    net = build_net({**NET, "dropout": dropout} if dropout else NET, seed=seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + seed)))
    return EDMPrecond(net).double()


# ---------------------------------------------------------------------------------------------
# the parameterisation
# ---------------------------------------------------------------------------------------------

def test_boundary_condition_holds_exactly_and_far_from_it_f_is_the_edm_form():
    inner = _edm()
    f = ConsistencyDenoiser(inner, sigma_min=0.002).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    # f(x, σ_min) = x, bit for bit (c_skip = 1, c_out = 0)
    assert torch.equal(f(x, torch.full((16,), 0.002, dtype=torch.float64)), x)
    c_skip, c_out, _ = consistency_scalings(torch.tensor(0.002, dtype=torch.float64))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    # elsewhere: c_skip·x + c_out·F(c_in·x, c_noise) with the reference's scalings and the teacher's backbone
    sigma = torch.exp(torch.linspace(-5, 4, 16, dtype=torch.float64))
    c_skip, c_out, c_in = consistency_scalings(sigma, 0.002, 0.5)
    _, _, c_in_edm, c_noise = edm_scalings(sigma, 0.5)
    torch.testing.assert_close(c_in, c_in_edm)
    with torch.no_grad():
        F = inner.net(c_in[:, None] * x, c_noise, None)
        assert F.abs().min() > 1e-3  # the backbone's output is not zero, so c_out is tested
        direct = c_skip[:, None] * x + c_out[:, None] * F
        torch.testing.assert_close(f(x, sigma), direct, rtol=1e-9, atol=1e-12)
        # at large σ the consistency model is the teacher's denoiser (c_skip, c_out → EDM's)
        big = torch.full((16,), 80.0, dtype=torch.float64)
        torch.testing.assert_close(f(x * 80, big), inner(x * 80, big), rtol=1e-4, atol=1e-4)


def test_any_denoiser_can_be_wrapped_and_the_checkpoint_round_trips(tmp_path):
    teacher = load_model("shipped:digits")
    f = ConsistencyDenoiser(copy.deepcopy(teacher.denoiser), 0.002)
    cfg = {"format": "fewstep.model", "version": 1, "type": "denoiser", "data": teacher.config["data"],
           "sampling": {"sampler": "consistency", "steps": 1, "schedule": "consistency"}}
    from fewstep.model import network_spec

    save_model(tmp_path / "m", f, {**cfg, **network_spec(f)})
    back = load_model(tmp_path / "m")
    assert isinstance(back.denoiser, ConsistencyDenoiser) and back.denoiser.sigma_min == 0.002
    assert json.loads((tmp_path / "m" / "config.json").read_text())["precond"]["inner"]["name"] == "edm"
    x, s = torch.randn(4, 1, 8, 8), torch.tensor([0.002, 0.1, 2.0, 80.0])
    with torch.no_grad():
        assert torch.equal(back.denoiser(x, s), f.eval()(x, s))
    # a wrapped denoiser that is not EDM-preconditioned (an exact mixture) satisfies the boundary condition too
    mix = ConsistencyDenoiser(GaussianMixture([1.0], [[0.3, -0.2]], [0.1]).denoiser(), 0.01)
    y = torch.randn(5, 2)
    assert torch.equal(mix(y, 0.01), y)


# ---------------------------------------------------------------------------------------------
# the teacher's ODE step and the grid
# ---------------------------------------------------------------------------------------------

def test_teacher_step_is_one_step_of_fewsteps_heun_and_euler_samplers():
    teacher = GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [0.8, 0.0]], [0.05, 0.2]).denoiser()
    x = torch.randn(8, 2, dtype=torch.float64) * 3.0
    for s, s_next in ((3.0, 1.7), (0.05, 0.01)):
        grid = torch.tensor([s, s_next], dtype=torch.float64)
        sig, sig_next = torch.full((8,), s, dtype=torch.float64), torch.full((8,), s_next, dtype=torch.float64)
        torch.testing.assert_close(teacher_ode_step(teacher, x, sig, sig_next, solver="heun"),
                                   heun(teacher, x, grid).x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(teacher_ode_step(teacher, x, sig, sig_next, solver="euler"),
                                   euler(teacher, x, grid).x, rtol=1e-12, atol=1e-12)


def test_grids():
    s = cd_sigmas(18)
    assert s.shape == (18,) and float(s[0]) == pytest.approx(80.0) and float(s[-1]) == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()
    torch.testing.assert_close(s, make_sigmas("karras", 18)[:-1])
    c = consistency_sigmas(2)  # [σ_max, the middle of the 3-point Karras grid, 0]
    torch.testing.assert_close(c, torch.cat([make_sigmas("karras", 3)[:2], torch.zeros(1)]))
    assert consistency_sigmas(1).tolist() == [80.0, 0.0]
    with pytest.raises(FewstepError, match="num_scales"):
        cd_sigmas(1)


# ---------------------------------------------------------------------------------------------
# the loss at the exact consistency function
# ---------------------------------------------------------------------------------------------

class GaussianConsistency(nn.Module):
    """f*(x, σ) = μ + (x − μ)·√((s² + σ_min²)/(s² + σ²)): the exact consistency function of N(μ, s²I)
    (its probability-flow ODE keeps (x − μ)/√(s² + σ²) constant)."""

    def __init__(self, mu, s2, sigma_min):
        super().__init__()
        self.mu, self.s2, self.sigma_min = torch.as_tensor(mu, dtype=torch.float64), s2, sigma_min

    def forward(self, x, sigma, labels=None):
        r = ((self.s2 + self.sigma_min**2) / (self.s2 + sigma**2)).sqrt()
        return self.mu + (x - self.mu) * append_dims(r, x.ndim)


def _loss(student, teacher, x0, num_scales, solver, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, num_scales - 1, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    sig = cd_sigmas(num_scales).double()
    return consistency_distillation_loss(student, student, teacher, x0, sig, solver=solver, index=idx,
                                         noise=noise)[0].mean()


def test_the_exact_consistency_function_of_a_gaussian_teacher_leaves_only_the_solvers_error():
    mu, s2 = [0.4, -0.3], 0.09
    teacher = GaussianMixture([1.0], [mu], [s2]).denoiser()
    x0 = (torch.tensor(mu, dtype=torch.float64) + 0.3 * torch.randn(4096, 2, dtype=torch.float64))
    exact = GaussianConsistency(mu, s2, 0.002)
    loss = {(n, sv): float(_loss(exact, teacher, x0, n, sv)) for n in (18, 72) for sv in ("heun", "euler")}
    # the denoiser is not f*: its self-inconsistency across a step shrinks only like the step, h²
    wrong = {n: float(_loss(ConsistencyDenoiser(teacher, 0.002), teacher, x0, n, "heun")) for n in (18, 72)}
    assert loss[(18, "heun")] < 0.05 * wrong[18] and loss[(72, "heun")] < 1e-3 * wrong[72], (loss, wrong)
    assert loss[(18, "heun")] < 0.3 * loss[(18, "euler")]  # Heun's local error is an order smaller
    # at f* only the solver's error is left, and it falls with N at the solver's order: Heun's local error
    # ~ h³ (squared h⁶: 4x the points → 4096x), Euler's ~ h² (squared h⁴: 256x)
    assert loss[(72, "heun")] < loss[(18, "heun")] / 1000, loss
    assert loss[(72, "euler")] < loss[(18, "euler")] / 100, loss


def test_a_mixture_teachers_consistency_function_by_fine_ode_solve_leaves_only_the_solvers_error():
    """The same identity for the two-mode mixture teacher of DESIGN §2, its consistency function
    computed by a 200-step Heun solve of the teacher's ODE down to σ_min: the loss falls like Heun's
    squared local error (h⁶) as the grid is refined, the teacher's denoiser's only like h²."""
    mix = GaussianMixture([0.4, 0.6], [[-0.8, 0.2], [0.7, -0.1]], [0.03, 0.06])
    teacher = mix.denoiser()

    class FineSolve(nn.Module):
        def forward(self, x, sigma, labels=None):
            out = torch.empty_like(x)
            for v in sigma.unique():
                m = sigma == v
                sig = make_sigmas("karras", 200, sigma_min=0.002, sigma_max=float(v)).double()[:-1]
                out[m] = heun(teacher, x[m], sig).x if float(v) > 0.002 * (1 + 1e-9) else x[m]
            return out

    x0 = mix.sample(256, generator=torch.Generator().manual_seed(1))
    exact, wrong = {}, {}
    for n in (12, 48):
        g = torch.Generator().manual_seed(2)
        idx = torch.randint(0, n - 1, (256,), generator=g)
        noise = torch.randn(256, 2, generator=g, dtype=torch.float64)
        grid = cd_sigmas(n).double()
        exact[n] = float(consistency_distillation_loss(FineSolve(), FineSolve(), teacher, x0, grid, index=idx,
                                                       noise=noise)[0].mean())
        den = ConsistencyDenoiser(teacher)
        wrong[n] = float(consistency_distillation_loss(den, den, teacher, x0, grid, index=idx, noise=noise)[0].mean())
    assert exact[48] < 1e-3 * wrong[48] and exact[12] < 0.1 * wrong[12], (exact, wrong)
    assert exact[48] < exact[12] / 1000 and wrong[48] > wrong[12] / 50, (exact, wrong)


def test_distances():
    a, b = torch.zeros(3, 4), torch.full((3, 4), 0.5)
    torch.testing.assert_close(consistency_distance(a, b, "l2"), torch.full((3,), 0.25))
    torch.testing.assert_close(consistency_distance(a, b, "l1"), torch.full((3,), 0.5))
    c = pseudo_huber_c((4,))
    assert c == pytest.approx(0.00054 * 2)
    torch.testing.assert_close(consistency_distance(a, b, "pseudo-huber"),
                               torch.full((3,), (1.0 + c * c) ** 0.5 - c))
    with pytest.raises(FewstepError, match="distance"):
        consistency_distance(a, b, "lpips")


# ---------------------------------------------------------------------------------------------
# the method: target network, dropout masks, gradients
# ---------------------------------------------------------------------------------------------

def test_target_shares_the_students_dropout_masks_and_gets_no_gradient():
    student = ConsistencyDenoiser(EDMPrecond(build_net({**NET, "dropout": 0.5}, seed=0)), 0.002).train()
    with torch.no_grad():  # the blocks' last layers start at zero, where dropout before them does nothing
        for p in student.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    target = copy.deepcopy(student).requires_grad_(False)

    class Still(nn.Module):  # D(x) = x: the ODE does not move, so the step leaves x where it is
        def forward(self, x, sigma, labels=None):
            return x

    x0 = torch.randn(64, 2)
    same = torch.tensor([0.7, 0.7])  # a "grid" whose two points coincide: f and its target see the same input
    per, _ = consistency_distillation_loss(student, target, Still(), x0, same)
    assert float(per.detach().abs().max()) == 0.0  # different dropout masks would differ by O(1)
    with torch.no_grad():  # ...which two passes without the rewind do
        assert (student(x0, same[:1].expand(64)) - target(x0, same[:1].expand(64))).abs().max() > 0.01
    per, _ = consistency_distillation_loss(student, target, Still(), x0, cd_sigmas(8))
    per.mean().backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in target.parameters())
    # the target's pass is a constant even when the target *is* the student (target_decay 0): the same
    # gradient as against a detached copy
    student.eval()
    g = torch.Generator().manual_seed(4)
    idx, noise = torch.randint(0, 7, (64,), generator=g), torch.randn(64, 2, generator=g)
    grads = []
    for tgt in (student, copy.deepcopy(student)):
        student.zero_grad()
        consistency_distillation_loss(student, tgt, Still(), x0, cd_sigmas(8), index=idx, noise=noise)[0].mean().backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_target_network_is_the_mu_ema_of_the_student_and_a_run_resumes_exactly(tmp_path):
    teacher = load_model("mixture:ring8")
    ds = load_dataset("mixture:ring8", n=2000)

    def make():
        torch.manual_seed(0)
        return ConsistencyDistillation.create(CDConfig(num_scales=10, lr=1e-3, target_decay=0.9), teacher=teacher,
                                              init=init_model(teacher, {**NET, "dropout": 0.1}))
    m = make()
    assert set(m.nets) == {"student", "target"} and m.ema_net == "student" and m.target.training
    m.optimizers = m.build_optimizers()
    old = {k: v.clone() for k, v in m.target.state_dict().items()}
    loss, stats = m.loss((ds.x[:100], None))
    loss.backward()
    m.optimizers["student"].step()
    m.end_iteration(100)
    for k, v in m.student.state_dict().items():
        torch.testing.assert_close(m.target.state_dict()[k], 0.9 * old[k] + 0.1 * v)

    cfg = train_config(total_kimg=1.0, checkpoint_every_kimg=0.2, ema_halflife_kimg=0.5)
    full, resumed = straight_and_resumed(make, cfg, tmp_path, ds)
    for name in ("student", "target"):
        for k, v in full.nets[name].state_dict().items():
            torch.testing.assert_close(resumed.nets[name].state_dict()[k], v, rtol=0, atol=0)
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert isinstance(a.denoiser, ConsistencyDenoiser)
    assert a.sampling["sampler"] == "consistency" and a.nfe() == 1 and a.nfe(steps=3) == 3
    assert torch.equal(a.sample(32, seed=1).x, b.sample(32, seed=1).x)


def test_multistep_consistency_sampler():
    f = GaussianConsistency([0.0, 0.0], 0.01, 0.002)  # the exact consistency function of N(0, 0.01·I)

    class Model(nn.Module):  # records the σ it is called at
        def __init__(self):
            super().__init__()
            self.calls = []
            self.boundary_sigma = 0.002

        def forward(self, x, sigma, labels=None):
            self.calls.append(float(sigma[0]))
            return f(x.double(), sigma.double()).float()

    from fewstep.diffusion.samplers import sample

    m = Model()
    z = initial_noise((6, 2), seed=3)
    one = sample(m, (6, 2), sampler="consistency", steps=1, schedule="consistency", seed=3)
    assert one.nfe == 1 and m.calls == [80.0]
    torch.testing.assert_close(one.x, f(80.0 * z.double(), torch.tensor(80.0)).float())  # one step: f(σ_max·z, σ_max), the teacher's z
    # the re-noising to σ₁ adds exactly √(σ₁² − σ_min²) of each sample's next noise draw: with f = identity and a
    # large σ_min (1.0) the two-step output is σ₀·z₀ + √(σ₁² − 1)·z₁, z₀, z₁ the per-sample streams' first two draws
    from fewstep.diffusion.samplers import _per_sample_seeds, randn_like

    class Identity(nn.Module):
        boundary_sigma = 1.0

        def forward(self, x, sigma, labels=None):
            return x

    gens = [torch.Generator().manual_seed(s) for s in _per_sample_seeds(5, 6)]
    z0, z1 = randn_like(torch.empty(6, 2), gens), randn_like(torch.empty(6, 2), gens)
    s1 = float(consistency_sigmas(2)[1])
    torch.testing.assert_close(sample(Identity(), (6, 2), sampler="consistency", steps=2, schedule="consistency",
                                      seed=5).x, 80.0 * z0 + (s1**2 - 1.0) ** 0.5 * z1)
    m.calls.clear()
    two = sample(m, (4000, 2), sampler="consistency", steps=2, schedule="consistency", seed=3)
    mid = float(consistency_sigmas(2)[1])
    assert two.nfe == 2 and m.calls == pytest.approx([80.0, mid])
    # the second input is f(x, 80) + √(σ₁² − σ_min²)·z, which f* maps back to the data's variance 0.01 + σ_min²
    assert float(two.x.var(0).mean()) == pytest.approx(0.01, rel=0.1)


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------

def test_cli_cd_then_sample_in_one_and_two_steps_and_bad_options(tmp_path, capsys):
    common = ring8_cli_args(tmp_path)
    teacher, init = load_model("mixture:ring8"), load_model(tmp_path / "init")
    assert cli_main(["distill", "cd", "--out", str(tmp_path / "cd"), "--num-scales", "12",
                     "--distance", "pseudo-huber", *common]) == 0
    assert_cli_samples_at_steps(tmp_path / "cd", tmp_path, capsys)
    run_cfg = json.loads((tmp_path / "cd" / "config.json").read_text())
    assert run_cfg["method"] == "cd" and run_cfg["method_config"]["num_scales"] == 12
    # a grid of its own: the student samples on it (the recipe carries sigma_min, sigma_max and rho)
    assert cli_main(["distill", "cd", "--out", str(tmp_path / "cd2"), "--sigma-min", "0.01", "--sigma-max", "20",
                     "--rho", "5", *common]) == 0
    student = load_model(tmp_path / "cd2")
    assert student.denoiser.sigma_min == 0.01
    seen = []
    student.denoiser.register_forward_pre_hook(lambda mod, args: seen.append(float(args[1][0])))
    student.sample(4, steps=3, seed=0)
    assert seen == pytest.approx(consistency_sigmas(3, 0.01, 20.0, 5.0)[:-1].tolist())
    # guidance would mix in the null class, which CD never trains
    with pytest.raises(FewstepError, match="without --guidance"):
        cond = load_model("shipped:digits")
        cond.config = {**cond.config, "precond": {"name": "consistency"}}
        cond.data_info.num_classes = 10
        cond.sample(2, guidance=2.0)
    # bf16 with pseudo-Huber is warned about
    lines = []
    m = ConsistencyDistillation.create(CDConfig(), teacher=teacher, init=init)
    m.log = lambda msg, echo=False: lines.append((msg, echo))
    m.check_training(train_config(precision="bf16"))
    assert len(lines) == 1 and "bf16" in lines[0][0] and lines[0][1]
    with pytest.raises(FewstepError, match="num_scales"):
        CDConfig(num_scales=1).validate()
    with pytest.raises(FewstepError, match="sigma_min"):
        CDConfig(sigma_min=0.0).validate()
    with pytest.raises(FewstepError, match="--init"):
        ConsistencyDistillation.create(CDConfig(), teacher=teacher)


def test_cd_student_approaches_the_teachers_ode_map(tmp_path):
    """Trained on the exact ring8 teacher from an untrained network, the one-step consistency model
    maps noise close to where the teacher's 35-NFE Heun sampler takes it: far closer than the initial
    network does, and closer than the teacher's own single denoising step."""
    teacher = load_model("mixture:ring8")
    torch.manual_seed(0)
    m = ConsistencyDistillation.create(CDConfig(num_scales=18, lr=2e-3, distance="l2"), teacher=teacher,
                                       init=init_model(teacher, {**NET, "width": 64}))
    err, one = ring8_one_step_map_errors(m, tmp_path)
    assert err < 0.3 * one, (err, one)  # measured: 0.127 against 0.720


def test_the_committed_cd_benchmark_student_loads_and_samples():
    """benchmarks/cd.py commits its digits student for re-evaluation with `fewstep eval`."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "students" / "cd-digits"
    student = load_model(path)
    assert isinstance(student.denoiser, ConsistencyDenoiser) and student.sampling["sampler"] == "consistency"
    for steps in (1, 2):
        res = student.sample(8, seed=0, steps=steps)
        assert res.nfe == steps and res.x.shape == (8, 1, 8, 8) and torch.isfinite(res.x).all()
