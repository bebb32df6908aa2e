"""BOOT (Gu et al. 2023): the signal step against the teacher's samplers, the loss against the exact
teacher path (zero there, and its boundary and 1/δ² terms off it), the student's path input, training on
an exact mixture teacher towards the teacher's own ODE samples, the CLI and exact resumption."""
import pytest
import torch
from torch import nn

from fewstep.cli import main as cli_main
from fewstep.diffusion import samplers
from fewstep.diffusion.denoiser import EDMPrecond
from fewstep.errors import FewstepError
from fewstep.methods.base import with_new_input
from fewstep.methods.boot import BOOT, BOOTConfig, boot_loss, boot_signal, boot_sigmas, signal_step
from fewstep.model import FewstepModel, load_model, mixture_model
from fewstep.nets.build import build_net

from step_helpers import NET, init_model, perturbed_conditional_denoiser, straight_and_resumed, train_config


def exact_teacher():
    return mixture_model("ring8")


class PathOfTeacher(nn.Module):
    """A "student" that knows the teacher's discrete path: for x_in = σ_init·ε it runs ``solver`` from σ_max·ε
    over ``sigmas`` and returns the signal y = x − σ_p·ε at the asked grid point σ_p (plus ``offset``)."""

    def __init__(self, teacher, sigmas, solver, sigma_init=2.5, offset=0.0):
        super().__init__()
        self.teacher, self.sigmas, self.solver = teacher, sigmas, solver
        self.sigma_init, self.offset = sigma_init, offset
        self.scale = nn.Parameter(torch.ones(()))  # something to differentiate

    def forward(self, x_in, sigma, labels=None, path=None):
        eps = x_in / self.sigma_init
        n = eps.shape[0]
        x = self.sigmas[0] * eps
        ys = [torch.zeros_like(eps)]
        for i in range(len(self.sigmas) - 1):
            s = self.sigmas[i].expand(n)
            y = signal_step(self.teacher, x - s[:, None] * eps, eps, s, self.sigmas[i + 1].expand(n), labels,
                            self.solver)
            x = y + self.sigmas[i + 1] * eps
            ys.append(y)
        ys = torch.stack(ys)  # [N + 1, n, dim]
        idx = torch.stack([(self.sigmas - p).abs().argmin() for p in path])
        return self.scale * ys[idx, torch.arange(n)] + self.offset


def test_the_euler_signal_step_is_ddim_in_y():
    teacher = exact_teacher().denoiser
    torch.manual_seed(0)
    n = 64
    y, eps = torch.randn(n, 2) * 0.5, torch.randn(n, 2)
    sigma = torch.rand(n) * 5 + 0.1
    sigma_next = sigma * torch.rand(n)
    got = signal_step(teacher, y, eps, sigma, sigma_next, solver="euler")
    d = teacher(y + sigma[:, None] * eps, sigma)
    delta = (1 - sigma_next / sigma)[:, None]
    torch.testing.assert_close(got, y + delta * (d - y))  # y_{n+1} = y_n + δ_n·(D − y_n)


@pytest.mark.parametrize("sigma_next", [0.7, 0.0])
def test_the_heun_signal_step_is_the_edm_samplers_step(sigma_next):
    teacher = exact_teacher().denoiser
    torch.manual_seed(1)
    n, s = 50, 2.3
    y, eps = torch.randn(n, 2) * 0.5, torch.randn(n, 2)
    got = signal_step(teacher, y, eps, torch.full((n,), s), torch.full((n,), sigma_next), solver="heun")
    x_next = samplers.heun(teacher, y + s * eps, torch.tensor([s, sigma_next])).x  # Euler into σ = 0
    torch.testing.assert_close(got, x_next - sigma_next * eps)


def test_mixed_rows_take_heun_where_the_next_level_is_positive_and_euler_into_zero():
    teacher = exact_teacher().denoiser
    torch.manual_seed(2)
    y, eps = torch.randn(4, 2), torch.randn(4, 2)
    sigma = torch.tensor([3.0, 0.5, 3.0, 0.5])
    nxt = torch.tensor([1.0, 0.0, 1.0, 0.0])
    got = signal_step(teacher, y, eps, sigma, nxt, solver="heun")
    for i in range(4):
        one = signal_step(teacher, y[i:i + 1], eps[i:i + 1], sigma[i:i + 1], nxt[i:i + 1], solver="heun")
        torch.testing.assert_close(got[i:i + 1], one)


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_the_loss_vanishes_on_the_teachers_own_path(solver):
    teacher = exact_teacher().denoiser
    sigmas = boot_sigmas(6)
    student = PathOfTeacher(teacher, sigmas, solver)
    torch.manual_seed(3)
    n = 60
    eps = torch.randn(n, 2)
    index = torch.arange(n) % 6  # every step, the boundary (n = 0) included
    per, info = boot_loss(student, teacher, eps, sigmas, sigma_init=2.5, solver=solver, index=index)
    assert per.max() < 1e-9, per.max()
    # and the path's end is the teacher's own sampler from σ_max·ε
    end = boot_signal(student, eps, torch.zeros(n), 2.5)
    ref = (samplers.heun if solver == "heun" else samplers.euler)(teacher, sigmas[0] * eps, sigmas).x
    torch.testing.assert_close(end, ref)
    # the other solver's path is not a zero of this loss
    other = PathOfTeacher(teacher, sigmas, "euler" if solver == "heun" else "heun")
    assert boot_loss(other, teacher, eps, sigmas, solver=solver, index=index)[0].mean() > 1e-4


def test_the_boundary_terms_start_from_the_exact_zero_signal_and_are_weighted_and_scaled_by_one_over_delta_squared():
    teacher = exact_teacher().denoiser
    sigmas = boot_sigmas(6)
    c = 0.01
    student = PathOfTeacher(teacher, sigmas, "heun", offset=c)  # every prediction off by c in each coordinate
    torch.manual_seed(4)
    n = 40
    eps = torch.randn(n, 2)
    index = torch.zeros(n, dtype=torch.long)  # boundary rows: the target does not read the student
    delta0 = float(1 - sigmas[1] / sigmas[0])
    for w in (1.0, 3.0):
        per, info = boot_loss(student, teacher, eps, sigmas, boundary_weight=w, index=index)
        torch.testing.assert_close(per, torch.full((n,), w * 2 * c * c / delta0**2))
        # the boundary target is the teacher's first Heun step from σ_max·ε, mapped to y
        first = samplers.heun(teacher, sigmas[0] * eps, sigmas[:2]).x - sigmas[1] * eps
        torch.testing.assert_close(info["target"], first)


def test_only_the_prediction_is_differentiated():
    teacher = exact_teacher().denoiser
    sigmas = boot_sigmas(6)
    student = PathOfTeacher(teacher, sigmas, "heun")
    eps = torch.randn(30, 2)
    index = torch.full((30,), 3)
    per, info = boot_loss(student, teacher, eps, sigmas, index=index)
    assert not info["target"].requires_grad and info["pred"].requires_grad
    per.sum().backward()
    # d/d(scale) of Σ‖scale·y_4 − y*_4‖²/δ² at scale 1 (y*_4 = y_4 on the path): 0; then off the path
    assert abs(float(student.scale.grad)) < 1e-6
    with torch.no_grad():
        student.scale.fill_(1.1)
    student.scale.grad = None
    per, info = boot_loss(student, teacher, eps, sigmas, index=index)
    per.sum().backward()
    y4 = info["pred"].detach() / 1.1
    delta = float(1 - sigmas[4] / sigmas[3])
    # the target (from the scaled student's ŷ_3) is held fixed: only ∂pred/∂scale = y_4 counts
    expected = (2 * (info["pred"].detach() - info["target"]) * y4).sum() / delta**2
    torch.testing.assert_close(student.scale.grad, expected, rtol=1e-4, atol=1e-6)


def test_a_fresh_path_input_leaves_the_network_and_then_learns():
    _, den = perturbed_conditional_denoiser(0.3, num_classes=0)
    student = with_new_input(den, "path_embedding", "x", "y")
    assert student.path_embedding and not den.path_embedding
    torch.manual_seed(5)
    x, s = torch.randn(16, 2), torch.rand(16) + 0.1
    for p in (None, 0.0, 5.0, torch.rand(16) * 80):
        torch.testing.assert_close(student(x, s, path=p), den(x, s))
    out = student(x, s, path=torch.full((16,), 3.0)).square().sum()
    out.backward()
    assert student.net.embed.path.weight.grad.abs().sum() > 0
    with torch.no_grad():  # trained: σ_p matters, and no σ_p means σ_p = 0 (the data end of the path)
        student.net.embed.path.weight.normal_()
    torch.testing.assert_close(student(x, s), student(x, s, path=0.0))
    assert (student(x, s) - student(x, s, path=5.0)).abs().max() > 1e-3
    with pytest.raises(FewstepError, match="no path input"):
        den(x, s, path=1.0)


def test_the_unet_takes_a_path_input_too():
    net = build_net({"name": "unet", "img_resolution": 8, "model_channels": 16, "channel_mult": [1, 2],
                     "num_blocks": 1, "path_embedding": True})
    den = EDMPrecond(net)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():  # a trained net (a fresh one's residual branches and output layer are zero)
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    a, b = den(x, torch.ones(3), path=torch.zeros(3)), den(x, torch.ones(3), path=torch.full((3,), 4.0))
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(den(x, torch.ones(3)), a)


def test_training_on_an_exact_teacher_approaches_its_ode_samples(tmp_path):
    teacher = exact_teacher()
    torch.manual_seed(0)
    method = BOOT.create(BOOTConfig(steps=12, lr=1e-3), teacher=teacher, init=init_model(teacher))
    torch.manual_seed(7)
    eps = torch.randn(2000, 2)
    ref = samplers.heun(teacher.denoiser, 80 * eps, boot_sigmas(12)).x

    def rms():
        with torch.no_grad():
            return float((boot_signal(method.student, eps, torch.zeros(2000), 2.5) - ref).pow(2).mean().sqrt())

    before = rms()
    from fewstep.training.loop import Trainer
    Trainer(method, train_config(total_kimg=40.0, batch_size=256, grad_clip=None), tmp_path / "run").run_training()
    after = rms()
    assert after < before / 4, (before, after)
    assert after < 0.2 * float(ref.std())


def test_refusals():
    teacher = exact_teacher()
    with pytest.raises(FewstepError, match="class-conditional"):
        BOOT.create(BOOTConfig(guidance=2.0), teacher=teacher, init=init_model(teacher))
    with pytest.raises(FewstepError, match="needs --init|has none"):
        BOOT.create(BOOTConfig(), teacher=teacher)
    gen = init_model(teacher)
    gen = FewstepModel(gen.denoiser, {**gen.config, "type": "generator",
                                      "sampling": {"sampler": "one-step", "sigma_init": 2.5}})
    with pytest.raises(FewstepError, match="without a path input"):
        BOOT.create(BOOTConfig(), teacher=teacher, init=gen)
    with pytest.raises(FewstepError, match="solver"):
        BOOTConfig(solver="rk4").validate()
    with pytest.raises(FewstepError, match="steps"):
        BOOTConfig(steps=0).validate()


def test_cli_boot_on_digits_then_sample_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["distill", "boot", "--teacher", "shipped:digits", "--out", str(out), "--total-kimg", "0.064",
            "--batch-size", "16", "--steps", "4", "--no-progress", "--snapshot-every-kimg", "100"]
    assert cli_main(args) == 0
    model = load_model(out)
    assert model.is_generator and model.config["sampling"] == {"sampler": "one-step", "sigma_init": 2.5}
    assert model.config["net"]["path_embedding"] and model.config["provenance"]["boot"]["steps"] == 4
    res = model.sample(8, seed=0)
    assert res.nfe == 1 and res.x.shape == (8, 1, 8, 8) and torch.isfinite(res.x).all()
    assert cli_main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "s.npz")]) == 0


def test_a_killed_boot_run_resumes_exactly(tmp_path):
    teacher = exact_teacher()

    def make():
        torch.manual_seed(0)
        init = init_model(teacher, net={**NET, "dropout": 0.1})
        return BOOT.create(BOOTConfig(steps=8, lr=1e-3), teacher=teacher, init=init)

    cfg = train_config(total_kimg=1.0, checkpoint_every_kimg=0.2, ema_halflife_kimg=0.5)
    full, resumed = straight_and_resumed(make, cfg, tmp_path)
    for k, v in full.student.state_dict().items():  # noise and grid steps redrawn identically
        torch.testing.assert_close(resumed.student.state_dict()[k], v, rtol=0, atol=0)
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    torch.testing.assert_close(a.sample(50, seed=2).x, b.sample(50, seed=2).x, rtol=0, atol=0)


def test_a_two_head_network_takes_the_path_input_through_its_backbone():
    from fewstep.nets.two_head import two_head_from

    _, den = perturbed_conditional_denoiser(0.3, num_classes=0)
    two = EDMPrecond(two_head_from(den.net))
    student = with_new_input(two, "path_embedding", "x", "y")
    assert student.path_embedding
    x, s = torch.randn(8, 2), torch.rand(8) + 0.1
    torch.testing.assert_close(student(x, s, path=3.0), two(x, s))
    with torch.no_grad():
        student.net.inner.embed.path.weight.normal_()
    assert (student(x, s, path=3.0) - student(x, s)).abs().max() > 1e-4


# ---- proposed by the review of BOOT/SDS (mutation testing) -------------------------------------------------

def conditional_network_teacher():
    """A class-conditional network teacher (3 classes, label 3 = none) as a FewstepModel, and its denoiser."""
    net, den = perturbed_conditional_denoiser(0.3, num_classes=3)
    model = FewstepModel(den, {"type": "denoiser", "net": net, "precond": {"name": "edm", "sigma_data": 0.5},
                               "data": {"kind": "points", "sample_shape": [2], "num_classes": 3, "name": "x"}})
    return model, den


def path_student(den, scale=0.5):
    """``den`` with a path input whose weights are not zero (so σ_p matters), as BOOT's student is once trained."""
    student = with_new_input(den, "path_embedding", "x", "y")
    with torch.no_grad():
        student.net.embed.path.weight.normal_(0, scale)
    return student


def test_the_targets_student_pass_is_in_eval_mode_and_the_prediction_in_train_mode():
    """y*_{n+1} = step(g_eval(ε, σ_n)): the target starts from the function that is sampled (dropout off), the
    prediction is the training pass (dropout on), and the student is left in the mode it was in."""
    teacher = exact_teacher().denoiser
    torch.manual_seed(0)
    den = EDMPrecond(build_net({**NET, "dropout": 0.5}))
    with torch.no_grad():
        for p in den.parameters():
            p.add_(0.3 * torch.randn_like(p))
    student = path_student(den).train()
    sigmas = boot_sigmas(6)
    n = 64
    eps = torch.randn(n, 2)
    index = torch.arange(n) % 5 + 1  # bootstrapped rows only: each reads the student at σ_n
    with torch.no_grad():  # the precondition: dropout changes this student's output
        assert (boot_signal(student, eps, sigmas[index], 2.5) - boot_signal(student, eps, sigmas[index], 2.5)
                ).abs().max() > 1e-3
    per, info = boot_loss(student, teacher, eps, sigmas, index=index, solver="euler")
    assert student.training
    with torch.no_grad():
        student.eval()
        y_n, y_next = boot_signal(student, eps, sigmas[index], 2.5), boot_signal(student, eps, sigmas[index + 1], 2.5)
        student.train()
        target = signal_step(teacher, y_n, eps, sigmas[index], sigmas[index + 1], solver="euler")
    torch.testing.assert_close(info["target"], target)
    assert (info["pred"].detach() - y_next).abs().max() > 1e-3  # the prediction has dropout


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_each_rows_loss_depends_only_on_its_own_noise_label_and_step(solver):
    """Rows are independent: in a batch mixing boundary rows (no student pass), bootstrapped rows and last steps
    (Euler into σ = 0, no Heun correction), every row's loss and target are those it has alone, with its own label
    in the student's target pass and in the teacher's second (Heun) evaluation."""
    _, teacher = conditional_network_teacher()
    _, den = perturbed_conditional_denoiser(0.2, num_classes=3)
    student = path_student(den).eval()
    sigmas = boot_sigmas(4)
    torch.manual_seed(6)
    eps = torch.randn(8, 2)
    index = torch.tensor([0, 2, 3, 1, 0, 3, 2, 1])  # rows read the student and take Heun at different places
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, 0])
    per, info = boot_loss(student, teacher, eps, sigmas, labels, solver=solver, index=index)
    for i in range(8):
        one, one_info = boot_loss(student, teacher, eps[i:i + 1], sigmas, labels[i:i + 1], solver=solver,
                                  index=index[i:i + 1])
        torch.testing.assert_close(per[i:i + 1], one, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(info["target"][i:i + 1], one_info["target"], rtol=1e-4, atol=1e-6)
    other = boot_loss(student, teacher, eps, sigmas, (labels + 1) % 3, solver=solver, index=index)[0]
    assert (other - per).abs().max() > 1e-3  # the labels matter here, so the check above has teeth


def test_the_grid_step_is_drawn_uniformly_over_every_step_the_boundary_and_the_last_included():
    """n ~ U{0, …, N−1}: each of the N steps in 1/N of the rows (within five standard errors), σ_{n+1} read at n + 1."""
    class Zero(nn.Module):
        def forward(self, x_in, sigma, labels=None, path=None):
            return torch.zeros_like(x_in)

    teacher = exact_teacher().denoiser
    steps, m = 5, 5000
    sigmas = boot_sigmas(steps)
    torch.manual_seed(8)
    _, info = boot_loss(Zero(), teacher, torch.randn(m, 2), sigmas, solver="euler")
    index = info["index"]
    assert int(index.min()) >= 0 and int(index.max()) <= steps - 1
    counts = torch.bincount(index, minlength=steps).double()
    p = 1 / steps
    assert ((counts - m * p).abs() <= 5 * (m * p * (1 - p)) ** 0.5).all(), counts
    torch.testing.assert_close(info["sigma_next"], sigmas[index + 1])


def test_the_method_hands_its_guided_teacher_labels_and_settings_to_the_loss(monkeypatch):
    """BOOT.loss draws labels of the student's classes, guides the teacher by κ (κ·D(x|c) + (1 − κ)·D(x|∅)) and
    passes its σ_init, solver and boundary weight on."""
    import fewstep.methods.boot as boot_mod

    teacher, den = conditional_network_teacher()
    cfg = BOOTConfig(steps=4, guidance=2.5, sigma_init=1.7, boundary_weight=0.3, solver="euler")
    method = BOOT.create(cfg, teacher=teacher)
    method.batch_size = 16
    seen = {}
    real = boot_mod.boot_loss

    def spy(student, teacher, noise, sigmas, labels=None, **kw):
        seen.update(teacher=teacher, labels=labels, kw=kw)
        return real(student, teacher, noise, sigmas, labels, **kw)

    monkeypatch.setattr(boot_mod, "boot_loss", spy)
    loss, _ = method.loss(None)
    assert torch.isfinite(loss)
    labels = seen["labels"]
    assert labels is not None and labels.shape == (16,) and 0 <= int(labels.min()) and int(labels.max()) < 3
    assert (seen["kw"]["sigma_init"], seen["kw"]["solver"], seen["kw"]["boundary_weight"]) == (1.7, "euler", 0.3)
    torch.manual_seed(9)
    x, s = torch.randn(16, 2), torch.rand(16) * 3 + 0.1
    with torch.no_grad():
        d_c, d_u = den(x, s, labels), den(x, s, torch.full_like(labels, 3))
        torch.testing.assert_close(seen["teacher"](x, s, labels), d_u + 2.5 * (d_c - d_u))


def test_guidance_with_an_unconditional_init_names_the_init_and_a_negative_path_level_is_refused():
    teacher, _ = conditional_network_teacher()
    plain = init_model(exact_teacher())  # unconditional: the student would draw no labels
    with pytest.raises(FewstepError, match="--init is unconditional"):
        BOOT.create(BOOTConfig(guidance=3.0), teacher=teacher, init=plain)
    _, den = perturbed_conditional_denoiser(0.3, num_classes=0)
    student = with_new_input(den, "path_embedding", "x", "y")
    with pytest.raises(FewstepError, match="must be >= 0"):
        student(torch.randn(4, 2), torch.ones(4), path=torch.tensor([0.0, 1.0, -0.7, 2.0]))
