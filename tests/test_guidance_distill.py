"""Guidance distillation (Meng et al. 2023): the guided target against the exact conditional mixture, the
student's guidance input, the loss, training on an exact teacher, one pass per step, and step distillation
of the guidance-distilled student."""
import pytest
import torch

from fewstep.cli import main as cli_main
from fewstep.data.files import from_arrays
from fewstep.diffusion.denoiser import EDMPrecond, edm_loss_weight
from fewstep.diffusion.guidance import CFGDenoiser, GuidanceInput, is_guidance_conditioned, with_guidance
from fewstep.errors import FewstepError
from fewstep.methods.guidance import (GuidanceConfig, GuidanceDistillation, guidance_distillation_loss,
                                      guidance_student, guided_target, sample_guidance)
from fewstep.methods.progressive import Progressive, ProgressiveConfig, progressive_loss
from fewstep.model import FewstepModel, load_model, save_model
from fewstep.nets.build import build_net
from fewstep.training.loop import Trainer

from step_helpers import (NET, init_model, perturbed_conditional_denoiser, straight_and_resumed, three_mode_mixture,
                          train_config)

K = 3  # classes of the test mixture: label k is component k, label 3 is "no label"


def conditional_teacher() -> FewstepModel:
    """The exact three-component mixture as a class-conditional teacher (DESIGN §2)."""
    mix = three_mode_mixture()
    cfg = {"format": "fewstep.model", "version": 1, "type": "mixture", "mixture": mix.to_dict(),
           "data": {"kind": "points", "sample_shape": [2], "num_classes": K, "name": "m3"},
           "sampling": {"sampler": "heun", "steps": 18, "schedule": "karras"}}
    return FewstepModel(mix.denoiser(conditional=True), cfg)


def labelled_points(n=20000, seed=0):
    mix = three_mode_mixture()
    x, comp = mix.sample(n, generator=torch.Generator().manual_seed(seed), return_components=True)
    return from_arrays("m3", x.numpy(), comp.numpy(), kind="points")


def test_guided_target_is_the_exact_cfg_combination_per_sample():
    teacher = conditional_teacher().denoiser
    torch.manual_seed(0)
    n = 64
    x = torch.randn(n, 2)
    sigma = torch.rand(n) * 3 + 0.05
    labels = torch.randint(0, K, (n,))
    scale = sample_guidance(n, 1.0, 5.0)
    got = guided_target(teacher, x, sigma, labels, scale)
    d_c = teacher(x, sigma, labels)
    d_u = teacher(x, sigma, torch.full_like(labels, K))
    torch.testing.assert_close(got, d_u + scale[:, None] * (d_c - d_u))
    # the null label's target is the unconditional prediction at every κ
    torch.testing.assert_close(guided_target(teacher, x, sigma, torch.full_like(labels, K), scale), d_u)
    assert scale.min() >= 1.0 and scale.max() <= 5.0 and scale.std() > 0.5


def test_a_fresh_guidance_input_leaves_the_teachers_prediction_and_then_learns():
    _, den = perturbed_conditional_denoiser(0.3, num_classes=K)
    student = guidance_student(den)
    assert is_guidance_conditioned(student) and not is_guidance_conditioned(den)
    x, sigma, labels = torch.randn(16, 2), torch.full((16,), 0.7), torch.arange(16) % K
    for kappa in (1.0, 2.5, torch.linspace(0, 6, 16)):
        torch.testing.assert_close(student(x, sigma, labels, guidance=kappa), den(x, sigma, labels))
    # the zero-initialised layer gets a gradient, and once it moves κ changes the prediction
    student(x, sigma, labels, guidance=3.0).sum().backward()
    assert student.net.embed.guidance.weight.grad.abs().sum() > 0
    with torch.no_grad():
        student.net.embed.guidance.weight.normal_()
    assert (student(x, sigma, labels, guidance=3.0) - student(x, sigma, labels, guidance=1.0)).abs().max() > 1e-3
    # a net without a guidance input refuses κ instead of ignoring it
    with pytest.raises(FewstepError, match="no guidance input"):
        den(x, sigma, labels, guidance=2.0)
    with pytest.raises(FewstepError, match="guidance-conditioned"):
        GuidanceInput(den, 2.0)
    assert isinstance(with_guidance(den, 2.0), CFGDenoiser) and isinstance(with_guidance(student, 2.0), GuidanceInput)


class _ExactGuided(torch.nn.Module):
    """A 'student' that returns the exact guided prediction (+ offset): the loss must be λ(σ)·‖offset‖²."""

    def __init__(self, teacher, offset=0.0):
        super().__init__()
        self.teacher, self.offset = teacher, offset

    def forward(self, x, sigma, labels, guidance=None):
        return CFGDenoiser(self.teacher, guidance, null_label=K)(x, sigma, labels) + self.offset


def test_the_loss_is_zero_at_the_guided_target_and_edm_weighted_off_it():
    teacher = conditional_teacher().denoiser
    torch.manual_seed(1)
    x0, labels = torch.randn(32, 2), torch.randint(0, K + 1, (32,))
    scale, sigma = sample_guidance(32, 1.0, 4.0), torch.rand(32) * 2 + 0.1
    per, info = guidance_distillation_loss(_ExactGuided(teacher), teacher, x0, labels, scale, sigma=sigma)
    assert per.abs().max() < 1e-10
    off = torch.tensor([0.3, -0.1])
    per, _ = guidance_distillation_loss(_ExactGuided(teacher, off), teacher, x0, labels, scale, sigma=sigma)
    torch.testing.assert_close(per, edm_loss_weight(sigma) * off.pow(2).sum())
    assert torch.equal(info["sigma"], sigma)


def test_training_on_the_exact_teacher_learns_cfg_in_one_pass(tmp_path):
    teacher = conditional_teacher()
    init = init_model(teacher, net={**NET, "num_classes": K, "width": 64})
    ds = labelled_points()
    torch.manual_seed(0)
    m = GuidanceDistillation.create(GuidanceConfig(lr=2e-3, guidance_max=4.0), teacher=teacher, dataset=ds,
                                    init=init)

    def error(den, kappa):  # RMS gap to the exact guided denoiser on noised data, κ fixed
        g = torch.Generator().manual_seed(5)
        x0, lab = ds.x[:2000], ds.labels[:2000]
        sigma = torch.exp(torch.randn(2000, generator=g) * 1.2 - 1.2)
        x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            d = den(x, sigma, lab, guidance=kappa)
        return (d - guided_target(teacher.denoiser, x, sigma, lab, kappa)).pow(2).sum(1).mean().sqrt()

    before = {k: float(error(m.student, k)) for k in (1.0, 2.5, 4.0)}
    Trainer(m, train_config(total_kimg=200.0, batch_size=256, ema_halflife_kimg=2.0), tmp_path / "run",
            dataset=ds).run_training()
    student = load_model(tmp_path / "run")
    assert student.config["net"]["guidance_embedding"] is True
    assert student.config["provenance"]["guidance_range"] == [1.0, 4.0]
    after = {k: float(error(student.denoiser, k)) for k in before}
    for k in before:
        assert after[k] < before[k] / 3, (k, before, after)
    # sampling at κ: one network pass per step where the teacher's CFG takes two, and the same samples
    for kappa in (2.0, 3.5):
        a, b = student.sample(1000, seed=1, guidance=kappa), teacher.sample(1000, seed=1, guidance=kappa)
        assert a.nfe == 35 and b.nfe == 70
        assert (a.x - b.x).pow(2).sum(1).mean().sqrt() < 0.1 * b.x.std()


def test_guidance_distillation_refuses_what_it_cannot_distil():
    teacher = conditional_teacher()
    ds = labelled_points(200)
    init = init_model(teacher, net={**NET, "num_classes": K})
    with pytest.raises(FewstepError, match="class-conditional teacher"):
        uncond = FewstepModel(three_mode_mixture().denoiser(), {**teacher.config, "data": {
            **teacher.config["data"], "num_classes": 0}})
        GuidanceDistillation.create(GuidanceConfig(), teacher=uncond, dataset=ds, init=init_model(uncond))
    student = guidance_student(init.denoiser)
    distilled = FewstepModel(student, {**init.config, "net": {**init.config["net"], "guidance_embedding": True}})
    with pytest.raises(FewstepError, match="already guidance-distilled"):
        GuidanceDistillation.create(GuidanceConfig(), teacher=distilled, dataset=ds)
    unlabelled = from_arrays("m3", ds.x.numpy(), kind="points")
    with pytest.raises(FewstepError, match="no labels"):
        GuidanceDistillation.create(GuidanceConfig(), teacher=teacher, dataset=unlabelled, init=init)
    with pytest.raises(FewstepError, match="has none"):  # an exact teacher has no network to copy
        GuidanceDistillation.create(GuidanceConfig(), teacher=teacher, dataset=ds)
    with pytest.raises(FewstepError, match="guidance_max"):
        GuidanceConfig(guidance_min=3.0, guidance_max=2.0).validate()


def test_progressive_distils_a_guidance_student_at_its_kappa_range(tmp_path):
    teacher = _guidance_teacher(tmp_path)
    ds = labelled_points(2000)
    m = Progressive.create(ProgressiveConfig(start_steps=4, end_steps=2), teacher=teacher, dataset=ds)
    assert m.guidance_range == (1.5, 3.0)
    x0, labels = ds.x[:64], ds.labels[:64]
    torch.manual_seed(3)
    loss, _ = m.loss((x0, labels))
    kappa = m._kappa
    assert kappa.min() >= 1.5 and kappa.max() <= 3.0 and kappa.shape == (64,)
    torch.manual_seed(3)
    sample_guidance(64, 1.5, 3.0)  # the draw the loss made first
    per, _ = progressive_loss(GuidanceInput(m.student, kappa), GuidanceInput(m.teacher, kappa), x0, 2, labels)
    torch.testing.assert_close(loss, per.mean())
    torch.manual_seed(3)
    sample_guidance(64, 1.5, 3.0)
    plain, _ = progressive_loss(m.student, m.teacher, x0, 2, labels)  # κ ignored: a different loss
    assert (plain.mean() - loss).abs() > 1e-6
    Trainer(m, train_config(total_kimg=1.0, batch_size=100), tmp_path / "pd", dataset=ds).run_training()
    two = load_model(tmp_path / "pd")
    assert two.config["net"]["guidance_embedding"] and two.config["provenance"]["guidance_range"] == [1.5, 3.0]
    stage = load_model(tmp_path / "pd" / "stages" / "steps-2")
    assert stage.config["provenance"]["guidance_range"] == [1.5, 3.0]
    assert two.sample(10, guidance=2.0).nfe == 2


def test_cli_guidance_distillation_then_sampling_with_guidance(tmp_path, capsys):
    net = {**NET, "num_classes": 8}
    torch.manual_seed(0)
    den = EDMPrecond(build_net(net))
    with torch.no_grad():
        for p in den.parameters():
            p.add_(0.2 * torch.randn_like(p))
    cfg = {"format": "fewstep.model", "version": 1, "type": "denoiser", "net": net,
           "precond": {"name": "edm", "sigma_data": 0.5},
           "data": {"kind": "points", "sample_shape": [2], "num_classes": 8, "name": "mixture:ring8"},
           "sampling": {"sampler": "heun", "steps": 4, "schedule": "karras"}}
    save_model(tmp_path / "teacher", den, cfg)
    out = tmp_path / "run"
    assert cli_main(["distill", "guidance", "--teacher", str(tmp_path / "teacher"), "--out", str(out),
                     "--total-kimg", "0.3", "--batch-size", "64", "--guidance-max", "3", "--no-progress"]) == 0
    model = load_model(out)
    assert model.config["provenance"]["guidance_range"] == [1.0, 3.0]
    assert cli_main(["sample", str(out), "--n", "16", "--guidance", "2", "--out", str(tmp_path / "s.npz")]) == 0
    assert model.sample(16, guidance=2.0).nfe == 7  # Heun, 4 steps: 7 evaluations, not 14
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["distill", "guidance", "--help"])
    assert "guidance-max" in capsys.readouterr().out


def test_tract_gives_each_sample_its_own_kappa_in_the_self_teachers_partial_batch():
    from fewstep.diffusion.guidance import rows_of
    from fewstep.methods.tract import tract_indices, tract_target
    from fewstep.methods.step_distill import step_sigmas

    _, den = perturbed_conditional_denoiser(0.3, num_classes=K)
    teacher, self_teacher = guidance_student(den), guidance_student(den)
    with torch.no_grad():
        teacher.net.embed.guidance.weight.normal_(0, 0.5)
        self_teacher.net.embed.guidance.weight.normal_(0, 0.7)
    torch.manual_seed(2)
    n = 12
    j = torch.randint(1, 9, (n,))
    p, p_next, q, at_b = tract_indices(8, 2, j)
    assert at_b.any() and (~at_b).any()  # some samples bootstrap through the self-teacher, some do not
    st, ss = step_sigmas(8), step_sigmas(2)
    x, labels, kappa = torch.randn(n, 2), torch.arange(n) % K, sample_guidance(n, 1.0, 4.0)
    got = tract_target(GuidanceInput(teacher, kappa), GuidanceInput(self_teacher, kappa), x, st[p], st[p_next],
                       ss[q], at_b, labels)
    for i in range(n):  # each row alone, at its own scalar κ
        r = slice(i, i + 1)
        one = tract_target(GuidanceInput(teacher, float(kappa[i])), GuidanceInput(self_teacher, float(kappa[i])),
                           x[r], st[p][r], st[p_next][r], ss[q][r], at_b[r], labels[r])
        torch.testing.assert_close(got[r], one)
    cfg = CFGDenoiser(den, kappa, null_label=K)
    sub = rows_of(cfg, ~at_b)
    torch.testing.assert_close(sub.scale, kappa[~at_b])
    assert rows_of(den, ~at_b) is den


def test_the_committed_guidance_benchmark_student_loads_and_samples_in_one_pass():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "students"
    teacher, student = load_model(root / "teacher-digits-cond"), load_model(root / "guidance-digits")
    assert student.config["net"]["guidance_embedding"] and not teacher.config["net"].get("guidance_embedding")
    labels = torch.arange(20) % 10
    a = student.sample(20, seed=1, guidance=2.0, labels=labels)
    b = teacher.sample(20, seed=1, guidance=2.0, labels=labels)
    assert a.nfe == 35 and b.nfe == 70 and a.x.shape == b.x.shape == (20, 1, 8, 8)
    assert (a.x - b.x).pow(2).mean().sqrt() < 0.2  # the benchmark measured 0.066 at n = 1000


# ---- from an independent review's mutations ------------------------------------------------------------
def _guidance_teacher(tmp_path, lo=1.5, hi=3.0):
    """A saved guidance-distilled teacher whose κ input matters (its guidance layer perturbed)."""
    _, den = perturbed_conditional_denoiser(0.3, num_classes=K)
    student = guidance_student(den)
    with torch.no_grad():
        student.net.embed.guidance.weight.normal_(0, 0.5)
    cfg = {"format": "fewstep.model", "version": 1, "type": "denoiser",
           "net": {**NET, "num_classes": K, "guidance_embedding": True},
           "precond": {"name": "edm", "sigma_data": 0.5},
           "data": {"kind": "points", "sample_shape": [2], "num_classes": K, "name": "m3"},
           "sampling": {"sampler": "heun", "steps": 18, "schedule": "karras"},
           "provenance": {"method": "guidance", "guidance_range": [lo, hi]}}
    save_model(tmp_path / "gd", student, cfg)
    return load_model(tmp_path / "gd")


def test_the_method_loss_uses_the_null_fraction_its_sigma_distribution_and_the_students_sigma_data(monkeypatch):
    import fewstep.methods.guidance as G

    teacher = conditional_teacher()
    net = {**NET, "num_classes": K}
    init = init_model(teacher, net=net)
    init = FewstepModel(EDMPrecond(init.denoiser.net, sigma_data=0.3), init.config)  # σ_data ≠ EDM's 0.5
    ds = labelled_points(4000)
    m = GuidanceDistillation.create(GuidanceConfig(null_fraction=0.5, p_mean=0.4, p_std=0.3), teacher=teacher,
                                    dataset=ds, init=init)
    seen = {}
    real = G.guidance_distillation_loss

    def spy(*a, **kw):
        per, info = real(*a, **kw)
        seen.update(labels=a[3], per=per, **info)
        return per, info

    monkeypatch.setattr(G, "guidance_distillation_loss", spy)
    torch.manual_seed(0)
    x0, lab = ds.x, ds.labels
    loss, _ = m.loss((x0, lab))
    null = seen["labels"] == K
    assert 0.45 < float(null.float().mean()) < 0.55  # null_fraction of the samples carry the null label …
    assert torch.equal(seen["labels"][~null], lab[~null].long())  # … the others keep theirs
    log_s = seen["sigma"].log()
    assert abs(float(log_s.mean()) - 0.4) < 0.03 and abs(float(log_s.std()) - 0.3) < 0.03  # ln σ ~ N(p_mean, p_std²)
    lam = (seen["sigma"] ** 2 + 0.3 ** 2) / (seen["sigma"] * 0.3) ** 2  # λ(σ) with the student's σ_data
    torch.testing.assert_close(seen["per"], lam * (seen["pred"] - seen["target"]).pow(2).sum(1))
    torch.testing.assert_close(loss, seen["per"].mean())


def test_no_kappa_is_kappa_one_and_a_wrongly_sized_kappa_is_refused():
    _, den = perturbed_conditional_denoiser(0.3, num_classes=K)
    student = guidance_student(den)
    with torch.no_grad():
        student.net.embed.guidance.weight.normal_(0, 0.5)
    x, sigma, labels = torch.randn(16, 2), torch.full((16,), 0.7), torch.arange(16) % K
    # κ = 1 (w = κ − 1 = 0) is what the net predicts without κ, so `--guidance 1` and no --guidance agree
    torch.testing.assert_close(student(x, sigma, labels), student(x, sigma, labels, guidance=1.0))
    torch.testing.assert_close(student(x, sigma, labels, guidance=torch.full((16,), 2.5)),
                               student(x, sigma, labels, guidance=2.5))
    for bad in (torch.ones(1), torch.ones(3), torch.ones(16, 1)):
        with pytest.raises(FewstepError, match="one per sample"):
            student(x, sigma, labels, guidance=bad)


def test_tract_distils_a_guidance_student_with_the_same_kappa_for_all_three_nets(tmp_path):
    from fewstep.methods.tract import TRACT, TRACTConfig, tract_loss

    teacher = _guidance_teacher(tmp_path)
    ds = labelled_points(2000)
    m = TRACT.create(TRACTConfig(intervals=[8, 2]), teacher=teacher, dataset=ds)
    assert m.guidance_range == (1.5, 3.0) and is_guidance_conditioned(m.self_teacher)
    with torch.no_grad():  # a self-teacher unlike the student, so each net's κ shows in the loss
        for p in m.self_teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x0, labels = ds.x[:64], ds.labels[:64]
    c = m.config

    def reference(wrap):
        torch.manual_seed(3)
        kappa = sample_guidance(64, 1.5, 3.0)  # the draw the loss makes first
        per, info = tract_loss(*(wrap(n, kappa) for n in (m.student, m.teacher, m.self_teacher)), x0,
                               m.teacher_steps, m.student_steps, labels, sigma_max=c.sigma_max,
                               weighting=c.weighting, prediction=c.prediction)
        assert 0 < float(info["bootstrapped"]) < 1
        return per.mean()

    torch.manual_seed(3)
    loss, _ = m.loss((x0, labels))
    assert m._kappa.shape == (64,) and m._kappa.std() > 0.2  # per sample, not one κ per batch
    torch.testing.assert_close(loss, reference(lambda n, k: GuidanceInput(n, k)))
    for skip in (m.student, m.teacher, m.self_teacher):  # forgetting κ for any one of the three changes the loss
        alt = reference(lambda n, k: n if n is skip else GuidanceInput(n, k))
        assert (alt - loss).abs() > 1e-6


def test_a_two_head_student_of_a_guidance_teacher_keeps_the_guidance_input():
    from fewstep.nets.two_head import two_head_from

    _, den = perturbed_conditional_denoiser(0.3, num_classes=K)
    student = guidance_student(den)
    with torch.no_grad():
        student.net.embed.guidance.weight.normal_(0, 0.5)
    two = EDMPrecond(two_head_from(student.net), student.sigma_data)  # what --prediction both makes
    assert is_guidance_conditioned(two)
    x, sigma, labels = torch.randn(16, 2), torch.full((16,), 0.7), torch.arange(16) % K
    for kappa in (1.0, 3.0, torch.linspace(1, 4, 16)):
        torch.testing.assert_close(two(x, sigma, labels, guidance=kappa), student(x, sigma, labels, guidance=kappa))


def test_step_distillation_of_a_guidance_teacher_needs_a_conditional_guidance_student(tmp_path):
    teacher = _guidance_teacher(tmp_path)
    ds = labelled_points(500)
    uncond = FewstepModel(EDMPrecond(build_net(NET)), {**teacher.config, "net": NET,
                                                      "data": {**teacher.config["data"], "num_classes": 0}})
    with pytest.raises(FewstepError, match="student is unconditional"):
        Progressive.create(ProgressiveConfig(start_steps=4, end_steps=2), teacher=teacher, dataset=ds, init=uncond)


def test_bench_leaves_guidance_distillation_out_unless_named(tmp_path):
    from fewstep.bench import BenchConfig, registered_methods, run_bench

    assert registered_methods()["guidance"].bench_default is False
    assert registered_methods()["progressive"].bench_default is True
    with pytest.raises(FewstepError, match="not among the benched methods") as e:
        run_bench(BenchConfig(teacher="mixture:ring8", out=str(tmp_path / "b"), budget_kimg=1.0,
                              overrides={"guidance": {"lr": 1e-3}}))
    benched = str(e.value).rsplit("(", 1)[1]
    assert "progressive" in benched and "guidance" not in benched


def test_a_unet_guidance_student_starts_as_its_teacher_and_takes_kappa():
    net = {"name": "unet", "img_resolution": 8, "in_channels": 1, "model_channels": 16, "channel_mult": [1, 2],
           "num_blocks": 1, "mid_attn": False, "num_classes": K}
    torch.manual_seed(0)
    den = EDMPrecond(build_net(net))
    with torch.no_grad():
        for p in den.parameters():
            p.add_(0.1 * torch.randn_like(p))
    student = guidance_student(den)
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 0.7), torch.arange(4) % (K + 1)
    torch.testing.assert_close(student(x, sigma, labels, guidance=3.0), den(x, sigma, labels))
    with torch.no_grad():
        student.net.embed.guidance.weight.normal_(0, 0.5)
    d1, d3 = student(x, sigma, labels, guidance=1.0), student(x, sigma, labels, guidance=3.0)
    assert (d3 - d1).abs().max() > 1e-3  # κ reaches the UNet's blocks
    torch.testing.assert_close(student(x, sigma, labels), d1)
    torch.testing.assert_close(student(x, sigma, labels, guidance=torch.tensor([1.0, 3.0, 1.0, 3.0]))[1], d3[1])


def test_step_distillation_of_a_guidance_teacher_refuses_an_init_without_guidance_input_at_once(tmp_path):
    teacher = _guidance_teacher(tmp_path)
    ds = labelled_points(500)
    net = {**NET, "num_classes": K}
    plain = FewstepModel(EDMPrecond(build_net(net)), {**teacher.config, "net": net})
    with pytest.raises(FewstepError, match="--init has no guidance input"):
        Progressive.create(ProgressiveConfig(start_steps=4, end_steps=2), teacher=teacher, dataset=ds, init=plain)


def test_guidance_student_of_a_two_head_network():
    from fewstep.nets.two_head import two_head_from

    _, den = perturbed_conditional_denoiser(0.3, num_classes=K)
    two = EDMPrecond(two_head_from(den.net), den.sigma_data)
    g = guidance_student(two)
    assert is_guidance_conditioned(g) and not is_guidance_conditioned(two)
    x, sigma, labels = torch.randn(16, 2), torch.full((16,), 0.7), torch.arange(16) % K
    torch.testing.assert_close(g(x, sigma, labels, guidance=3.0), two(x, sigma, labels))


def test_guidance_distillation_refuses_an_init_with_other_classes():
    teacher, ds = conditional_teacher(), labelled_points(200)
    for kc in (2, 5):  # the teacher's null label is 3: the student's must be too
        init = init_model(teacher, net={**NET, "num_classes": kc})
        init = FewstepModel(init.denoiser, {**init.config, "data": {**init.config["data"], "num_classes": kc}})
        with pytest.raises(FewstepError, match="same classes"):
            GuidanceDistillation.create(GuidanceConfig(), teacher=teacher, dataset=ds, init=init)




def test_kappa_zero_is_the_null_labels_prediction_and_kappa_outside_the_range_warns(tmp_path):
    teacher = _guidance_teacher(tmp_path)  # learnt κ ∈ [1.5, 3]
    den = teacher.denoiser
    x, sigma, labels = torch.randn(16, 2), torch.full((16,), 0.7), torch.arange(16) % K
    torch.testing.assert_close(with_guidance(den, 0.0, null_label=K)(x, sigma, labels),
                               den(x, sigma, torch.full_like(labels, K)))
    with pytest.warns(UserWarning, match=r"outside the range \[1.5, 3\]"):
        teacher.sample(8, guidance=4.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher.sample(8, guidance=2.0)
        teacher.sample(8, guidance=0.0)  # the unconditional model: no extrapolation


def test_a_killed_guidance_run_resumes_exactly(tmp_path):
    teacher, ds = conditional_teacher(), labelled_points(2000)

    def make():
        torch.manual_seed(0)
        init = init_model(teacher, net={**NET, "num_classes": K, "dropout": 0.1})
        return GuidanceDistillation.create(GuidanceConfig(lr=1e-3), teacher=teacher, dataset=ds, init=init)

    cfg = train_config(total_kimg=1.0, checkpoint_every_kimg=0.2, ema_halflife_kimg=0.5)
    full, resumed = straight_and_resumed(make, cfg, tmp_path, ds)
    for k, v in full.student.state_dict().items():  # κ, σ, noise and null labels redrawn identically
        torch.testing.assert_close(resumed.student.state_dict()[k], v, rtol=0, atol=0)
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    torch.testing.assert_close(a.sample(50, seed=2, guidance=2.0).x, b.sample(50, seed=2, guidance=2.0).x,
                               rtol=0, atol=0)
