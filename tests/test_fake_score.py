"""Method-level behaviour of the fake-score family (SiD, Diff-Instruct, DMD)."""
import pytest
import torch

from fewstep.diffusion.denoiser import EDMPrecond, karras_sigmas
from fewstep.diffusion.samplers import heun
from fewstep.errors import FewstepError
from fewstep.methods.dmd import DMD, DMDConfig
from fewstep.methods.fake_score import set_dropout
from fewstep.methods.sid import SiD, SiDConfig
from fewstep.model import FewstepModel
from fewstep.nets import build_net

from step_helpers import perturbed_conditional_denoiser

NET = {"name": "mlp", "dim": 2, "width": 32, "depth": 2, "emb_channels": 16}


def _teacher():
    torch.manual_seed(0)
    den = EDMPrecond(build_net(NET))
    cfg = {"type": "denoiser", "net": NET, "precond": {"name": "edm", "sigma_data": 0.5},
           "data": {"kind": "points", "sample_shape": [2], "num_classes": 0, "name": "8gaussians"}}
    return FewstepModel(den, cfg)


def test_dmd_regression_pairs_are_teacher_ode_samples_and_are_checkpointed():
    teacher = _teacher()
    m = DMD.create(DMDConfig(regression_weight=0.25, regression_pairs=16, regression_steps=3), teacher=teacher)
    m.batch_size = 8
    m.optimizers = m.build_optimizers()
    loss, stats = m.generator_loss(None)
    assert torch.isfinite(loss) and stats["loss/regression"] > 0
    z, x, _ = m.pairs
    sig = karras_sigmas(3)
    torch.testing.assert_close(x, heun(teacher.denoiser, z * sig[0], sig).x)
    tensors, meta = m.extra_state()
    other = DMD.create(DMDConfig(regression_weight=0.25, regression_pairs=16, regression_steps=3), teacher=teacher)
    other.load_extra_state(tensors, meta)
    assert torch.equal(other.pairs[0], z) and torch.equal(other.pairs[1], x)


def test_generator_update_changes_only_the_generator():
    m = SiD.create(SiDConfig(), teacher=_teacher())
    m.batch_size = 16
    m.optimizers = m.build_optimizers()
    # an iteration starts with the fake-score update (before it f_ψ = f_φ and the G gradient is exactly 0)
    fake_phase = [p for p in m.phases() if p.name == "fake"][0]
    m.optimizers["fake"].zero_grad()
    fake_phase.loss(None)[0].backward()
    m.optimizers["fake"].step()
    fake0 = {k: v.clone() for k, v in m.fake.state_dict().items()}
    teacher0 = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    g0 = {k: v.clone() for k, v in m.G.state_dict().items()}
    gen_phase = [p for p in m.phases() if p.name == "generator"][0]
    opt = m.optimizers["generator"]
    opt.zero_grad()
    m.fake.zero_grad(set_to_none=True)
    loss, _ = gen_phase.loss(None)
    loss.backward()
    assert all(p.grad is None for p in m.fake.parameters())  # only θ gets gradients
    opt.step()
    assert all(torch.equal(v, fake0[k]) for k, v in m.fake.state_dict().items())
    assert all(torch.equal(v, teacher0[k]) for k, v in m.teacher.state_dict().items())
    assert any(not torch.equal(v, g0[k]) for k, v in m.G.state_dict().items())
    assert all(p.requires_grad for p in m.fake.parameters())  # restored for its own phase


def test_lr_decay_is_constant_then_inverse_sqrt_for_both_networks():
    m = SiD.create(SiDConfig(lr_g=1e-4, lr_fake=3e-4, lr_decay_kimg=50.0), teacher=_teacher())
    m.optimizers = m.build_optimizers()
    for nimg, factor in ((0, 1.0), (25_000, 1.0), (50_000, 1.0), (200_000, 0.5), (450_000, 1 / 3)):
        m.begin_iteration(nimg, 10**6)
        assert m.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(1e-4 * factor)
        assert m.optimizers["fake"].param_groups[0]["lr"] == pytest.approx(3e-4 * factor)
    const = SiD.create(SiDConfig(lr_g=1e-4), teacher=_teacher())  # 0 = the reference's constant rate
    const.optimizers = const.build_optimizers()
    const.begin_iteration(10**7, 10**8)
    assert const.optimizers["generator"].param_groups[0]["lr"] == 1e-4
    with pytest.raises(FewstepError, match="lr_decay_kimg"):
        SiDConfig(lr_decay_kimg=-1.0).validate()


def _dropout_teacher(rate: float = 0.3) -> FewstepModel:
    torch.manual_seed(0)
    net = {**NET, "dropout": rate}
    cfg = {"type": "denoiser", "net": net, "precond": {"name": "edm", "sigma_data": 0.5},
           "data": {"kind": "points", "sample_shape": [2], "num_classes": 0, "name": "8gaussians"}}
    teacher = FewstepModel(EDMPrecond(build_net(net)), cfg)
    with torch.no_grad():  # away from the zero-initialised output layer, so dropout shows in the output
        for p in teacher.denoiser.parameters():
            p.normal_(0, 0.5)
    return teacher


def test_dropout_option_overrides_generator_and_fake_but_not_the_teacher():
    teacher = _dropout_teacher()

    def rates(module):
        return {m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)}

    kept = SiD.create(SiDConfig(), teacher=teacher)  # unset: the teacher's rate (the reference)
    assert rates(kept.G) == rates(kept.fake) == {0.3}
    off = SiD.create(SiDConfig(dropout=0.0), teacher=teacher)
    assert rates(off.G) == rates(off.fake) == {0.0} and rates(teacher.denoiser) == {0.3}
    x, s = torch.randn(64, 2), torch.full((64,), 2.5)
    assert off.G.training and torch.equal(off.G(x, s), off.G(x, s))  # no dropout noise in train mode
    assert not torch.equal(kept.G(x, s), kept.G(x, s))
    with pytest.raises(FewstepError, match="dropout"):
        SiDConfig(dropout=1.0).validate()


@pytest.mark.parametrize("fake_eval", [False, True])
def test_fake_eval_puts_the_fake_score_in_eval_mode_inside_the_generator_loss_only(fake_eval):
    """G trains and samples in train mode; f_ψ trains with dropout, and with --fake-eval (the reference's
    mode) runs without it inside the generator loss, like the teacher."""
    m = SiD.create(SiDConfig(fake_eval=fake_eval), teacher=_dropout_teacher())
    m.batch_size = 32
    m.optimizers = m.build_optimizers()
    seen = []
    hooks = [net.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, mod.training)))
             for name, net in (("G", m.G), ("fake", m.fake))]
    phases = {p.name: p for p in m.phases()}
    phases["fake"].loss(None)
    assert seen == [("G", True), ("fake", True)]
    seen.clear()
    phases["generator"].loss(None)
    assert seen == [("G", True), ("fake", not fake_eval)]
    for h in hooks:
        h.remove()
    assert m.G.training and m.fake.training  # restored after each phase

    # with --fake-eval the generator loss does not depend on the fake score's dropout rate
    torch.manual_seed(1)
    with_dropout = phases["generator"].loss(None)[0]
    set_dropout(m.fake, 0.0)
    torch.manual_seed(1)
    without = phases["generator"].loss(None)[0]
    assert torch.equal(without, with_dropout) == fake_eval


def test_antithetic_pairs_share_x_g_and_sigma_with_opposite_noise():
    m = SiD.create(SiDConfig(antithetic=True), teacher=_teacher())
    m.batch_size = 10
    seen = {}

    def spy(x_t, sigma, labels=None):
        seen["x_t"], seen["sigma"] = x_t.detach(), sigma
        return x_t * 0.5

    x_g, labels = m.generator_step_inputs()
    assert x_g.shape == (10, 2) and torch.equal(x_g[:5], x_g[5:])
    m.per_sample_loss(x_g, spy, lambda x_t, s, l=None: x_t * 0.4, labels)
    s, x_t = seen["sigma"], seen["x_t"]
    torch.testing.assert_close(s[:5], s[5:])
    torch.testing.assert_close(x_t[:5] - x_g[:5].detach(), -(x_t[5:] - x_g[5:].detach()))
    assert (x_t[:5] != x_g[:5]).any()
    odd = SiD.create(SiDConfig(antithetic=True), teacher=_teacher())
    odd.batch_size = 7  # an odd batch: the last pair is cut to one row, the batch keeps its size
    x_g, labels = odd.generator_step_inputs()
    per, _ = odd.per_sample_loss(x_g, spy, lambda x_t, s, l=None: x_t * 0.4, labels)
    assert x_g.shape == (7, 2) and per.shape == (7,)


def test_t_max_anneal_moves_the_generator_sigma_range_with_images_seen():
    from fewstep.diffusion.denoiser import karras_ramp
    from fewstep.methods.fake_score import annealed_t_max

    assert annealed_t_max(10.0, 800.0, None, 0.0, 0.0) == 800.0  # unset: the reference's constant t_max
    for kimg, want in ((0.0, 800.0), (100.0, 800.0), (150.0, 650.0), (200.0, 500.0), (900.0, 500.0)):
        assert annealed_t_max(kimg, 800.0, 500.0, 100.0, 200.0) == pytest.approx(want)
    assert [annealed_t_max(k, 800.0, 500.0, 150.0, 150.0) for k in (149.9, 150.0, 150.1)] == [800.0, 800.0, 500.0]

    m = SiD.create(SiDConfig(t_max=800.0, t_max_end=500.0, t_max_anneal_kimg=(100.0, 200.0)), teacher=_teacher())
    m.optimizers = m.build_optimizers()
    m.batch_size = 4096
    seen = {}

    def spy(x_t, sigma, labels=None):
        seen["sigma"] = sigma
        return x_t * 0.5

    for nimg, t_max in ((0, 800.0), (150_000, 650.0), (10**6, 500.0)):
        m.begin_iteration(nimg, 10**7)
        assert m.t_max_now == pytest.approx(t_max)
        x_g, labels = m.generator_step_inputs()
        m.per_sample_loss(x_g.detach(), spy, lambda x_t, s, l=None: x_t * 0.4, labels)
        top = float(karras_ramp(torch.tensor(t_max / 1000.0)))
        assert seen["sigma"].max() <= top * (1 + 1e-5) and seen["sigma"].max() > 0.8 * top
    with pytest.raises(FewstepError, match="t_max_end"):
        SiDConfig(t_max_end=1200.0).validate()
    with pytest.raises(FewstepError, match="t_max_anneal_kimg"):
        SiDConfig(t_max_end=500.0, t_max_anneal_kimg=(200.0, 100.0)).validate()


def _warm_start_gradients(config, extra):
    """Gradients at x_g of SiD(config)'s generator loss at 0, 49 999, 50 000 and 10⁶ images seen, and of each
    ``extra`` pure loss (name → loss(x_g, teacher, fake)), every one under the same random draws."""
    m = SiD.create(config, teacher=_teacher())
    m.optimizers = m.build_optimizers()
    teacher, fake = m.teacher, m.fake
    with torch.no_grad():  # a fake score unlike the teacher: the gradients then differ
        for p in fake.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(3)
    x0 = torch.randn(64, 2)

    def grad(loss):
        x_g = x0.clone().requires_grad_(True)
        torch.manual_seed(4)
        return torch.autograd.grad(loss(x_g).sum(), x_g)[0]

    grads = {}
    for nimg in (0, 49_999, 50_000, 10**6):
        m.begin_iteration(nimg, 10**7)
        grads[nimg] = grad(lambda x_g: m.per_sample_loss(x_g, teacher, fake, None)[0])
    for name, loss in extra.items():
        grads[name] = grad(lambda x_g: loss(x_g, teacher, fake)[0])
    return grads


def test_detach_kimg_gives_the_detached_gradient_until_then_and_the_full_sid_gradient_after():
    from fewstep.methods.sid import sid_generator_loss

    grads = _warm_start_gradients(SiDConfig(detach_kimg=50.0), {
        through: lambda x_g, t, f, through=through: sid_generator_loss(x_g, t, f, t_max=800.0,
                                                                       through_networks=through)
        for through in (False, True)})
    assert (grads[True] - grads[False]).abs().max() > 1e-3  # the terms through the networks' inputs
    for nimg, through in ((0, False), (49_999, False), (50_000, True), (10**6, True)):
        torch.testing.assert_close(grads[nimg], grads[through])
    with pytest.raises(FewstepError, match="detach_kimg"):
        SiDConfig(detach_kimg=-1.0).validate()


def test_detach_loss_diff_instruct_gives_diff_instructs_own_gradient_during_the_warm_start():
    from fewstep.methods.diff_instruct import diff_instruct_generator_loss
    from fewstep.methods.sid import sid_generator_loss

    grads = _warm_start_gradients(SiDConfig(detach_kimg=50.0, detach_loss="diff-instruct"), {
        "diff-instruct": lambda x_g, t, f: diff_instruct_generator_loss(x_g, t, f, p_mean=-1.2, p_std=1.2),
        "sid-detached": lambda x_g, t, f: sid_generator_loss(x_g, t, f, t_max=800.0, through_networks=False),
        "sid": lambda x_g, t, f: sid_generator_loss(x_g, t, f, t_max=800.0)})
    # Diff-Instruct's σ law and unit weight are not SiD's detached loss: the two warm starts differ
    assert (grads["diff-instruct"] - grads["sid-detached"]).abs().max() > 1e-3
    for nimg, ref in ((0, "diff-instruct"), (49_999, "diff-instruct"), (50_000, "sid"), (10**6, "sid")):
        torch.testing.assert_close(grads[nimg], grads[ref])
    with pytest.raises(FewstepError, match="detach_loss must be one of sid, diff-instruct"):
        SiDConfig(detach_loss="dmd").validate()


def test_a_student_as_init_starts_the_generator_and_the_fake_score_starts_from_the_teacher():
    teacher = _teacher()
    torch.manual_seed(5)
    cfg = {"type": "generator", "net": NET, "precond": {"name": "edm", "sigma_data": 0.5},
           "data": {"kind": "points", "sample_shape": [2], "num_classes": 0, "name": "8gaussians"},
           "sampling": {"sampler": "one-step", "sigma_init": 2.5}}
    student = FewstepModel(EDMPrecond(build_net(NET)), cfg)
    assert student.is_generator
    m = SiD.create(SiDConfig(), teacher=teacher, init=student)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # noqa: E731
    assert same(m.G, student.denoiser) and same(m.fake, teacher.denoiser)
    assert not same(m.G, teacher.denoiser)
    # a denoiser as init (an MLP for a weightless exact-mixture teacher) starts both networks
    m2 = SiD.create(SiDConfig(), teacher=teacher, init=FewstepModel(student.denoiser, {**cfg, "type": "denoiser",
                                                                                       "sampling": {}}))
    assert same(m2.G, student.denoiser) and same(m2.fake, student.denoiser)


def test_bf16_autocast_sid_generator_gradient_agrees_with_fp32():
    """``--precision bf16``: the SiD generator gradient (through G, teacher and fake) of the shipped
    digits teacher, with a fake score moved off the teacher, points the way the fp32 one does."""
    from fewstep.demo import shipped_teacher
    from fewstep.methods.sid import sid_generator_loss
    from fewstep.model import load_model, one_step_generate

    m = SiD.create(SiDConfig(dropout=0.0), teacher=load_model(shipped_teacher("digits")))
    torch.manual_seed(1)
    with torch.no_grad():  # f_ψ ≠ f_φ: weights moved by 2% of their size
        for p in m.fake.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn_like(p))
    m.fake.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(128, 1, 8, 8, generator=g), torch.randn(128, 1, 8, 8, generator=g)
    sigma = torch.rand(128, generator=g) * 2 + 0.05

    def grad(enabled):
        m.G.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            x = one_step_generate(m.G, z, 2.5, None)
            per, info = sid_generator_loss(x, m.teacher, m.fake, sigma=sigma, noise=eps)
        assert per.dtype == info["y_real"].dtype == torch.float32  # the loss arithmetic stays fp32
        per.sum().backward()
        return torch.cat([p.grad.flatten() for p in m.G.parameters() if p.grad is not None])

    g32, g16 = grad(False), grad(True)
    assert not torch.equal(g32, g16)  # bf16 did run
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99
    assert 0.9 < float(g16.norm() / g32.norm()) < 1.1


class _NaNRow0(torch.nn.Module):
    """A teacher whose output is NaN for the batch's first row only (an overflow at its output)."""

    def __init__(self, den):
        super().__init__()
        self.den = den

    def forward(self, x, sigma, labels=None):
        y = self.den(x, sigma, labels)
        return torch.cat([torch.full_like(y[:1], float("nan")), y[1:]])


@pytest.mark.parametrize("method", ["sid", "diff-instruct", "dmd"])
def test_a_non_finite_sample_is_dropped_and_the_rest_of_the_batch_still_trains_the_generator(method):
    from fewstep.methods.base import get_method

    cls = get_method(method)
    m = cls.create(cls.Config(), teacher=_teacher())
    m.batch_size = 8
    with torch.no_grad():  # a fake score that differs from the teacher, so the gradient is not 0
        for p in m.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.teacher.requires_grad_(False)
    grads = {}
    for name, teacher in (("clean", m.teacher), ("nan", _NaNRow0(m.teacher))):
        m.teacher = teacher
        m.G.zero_grad()
        torch.manual_seed(3)
        loss, stats = m.generator_loss(None)
        loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in m.G.parameters()])
        assert torch.isfinite(loss) and stats["nan_samples/generator"] == (name == "nan")
    assert torch.isfinite(grads["nan"]).all()
    assert grads["nan"].abs().sum() > 0 and not torch.allclose(grads["nan"], grads["clean"])


def test_dmd_regression_pairs_follow_the_teachers_guidance_scale():
    from fewstep.diffusion.guidance import CFGDenoiser

    net, den = perturbed_conditional_denoiser(0.1)
    teacher = FewstepModel(den, {"type": "denoiser", "net": net, "precond": {"name": "edm", "sigma_data": 0.5},
                                 "data": {"kind": "points", "sample_shape": [2], "num_classes": 3, "name": "x"}})
    m = DMD.create(DMDConfig(guidance_teacher=3.0, regression_weight=0.25, regression_pairs=32, regression_steps=4),
                   teacher=teacher)
    m.batch_size = 8
    m.optimizers = m.build_optimizers()
    m.generator_loss(None)
    z, x, labels = m.pairs
    sig = karras_sigmas(4)
    with torch.no_grad():
        guided = heun(CFGDenoiser(m.teacher, 3.0, null_label=3), z * sig[0], sig, labels).x
        unguided = heun(m.teacher, z * sig[0], sig, labels).x
    torch.testing.assert_close(x, guided)
    assert (x - unguided).abs().max() > 1e-2
