"""Adversarial SiD (SiDA): the discriminator read from the fake network's encoder, its losses
against their closed forms, and the method's schedule (warm-up, GAN term, gradient clip)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fewstep.diffusion.denoiser import EDMPrecond, edm_loss_weight
from fewstep.errors import FewstepError
from fewstep.methods.base import DataInfo
from fewstep.methods.sid import SiDConfig, sid_generator_loss, sid_weight
from fewstep.methods.sida import (SiDA, SiDAConfig, discriminator_logits, sida_discriminator_loss,
                                  sida_fake_loss, sida_generator_gan_loss, sida_generator_loss)
from fewstep.model import FewstepModel
from fewstep.nets import build_net

UNET = {"name": "unet", "img_resolution": 8, "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
        "mid_attn": False}


def _den(seed=0, net=UNET):
    torch.manual_seed(seed)
    den = EDMPrecond(build_net(net))
    with torch.no_grad():  # the UNet's residual branches start at zero: make them do something
        for p in den.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return den


def _teacher(num_classes=0):
    net = {**UNET, "num_classes": num_classes} if num_classes else UNET
    cfg = {"type": "denoiser", "net": net, "precond": {"name": "edm", "sigma_data": 0.5},
           "data": {"kind": "images", "sample_shape": [1, 8, 8], "num_classes": num_classes, "name": "digits"}}
    return FewstepModel(_den(net=net), cfg)


class _Data:
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
        self.labels = None


def test_features_come_from_the_same_pass_and_do_not_change_the_denoiser():
    den = _den()
    x, s = torch.randn(5, 1, 8, 8), torch.tensor([0.01, 0.3, 1.0, 2.5, 40.0])
    d, feats = den.forward_with_features(x, s)
    torch.testing.assert_close(d, den(x, s))
    torch.testing.assert_close(feats, den.encoder_features(x, s))
    assert feats.shape == (5, 16, 4, 4)  # the down path ends at 4x4 with 8·2 channels
    logits = discriminator_logits(feats)
    assert logits.shape == (5, 1, 4, 4)
    torch.testing.assert_close(logits, feats.mean(1, keepdim=True))


def test_discriminator_loss_matches_its_closed_form():
    w = torch.tensor([1.0, 2.0, 4.0])
    zero = torch.zeros(3, 1, 2, 2)
    # logits 0 on both sides: each BCE is ln 2, so the loss is w·ln 2
    torch.testing.assert_close(sida_discriminator_loss(zero, zero, w), w * math.log(2))
    # the BCE is the batch mean (the reference's reduction): one confident sample lowers every row
    lr = torch.zeros(3, 1, 2, 2)
    lr[0] = 50.0
    bce_real = (0 + 2 * math.log(2)) / 3
    torch.testing.assert_close(sida_discriminator_loss(lr, zero, w), w * (bce_real + math.log(2)) / 2)
    # a perfect discriminator has zero loss
    big = torch.full((3, 1, 2, 2), 60.0)
    assert float(sida_discriminator_loss(big, -big, w).abs().max()) < 1e-12


def test_generator_gan_loss_is_dims_times_clipped_bce_over_omega():
    logit = torch.tensor([[-20.0, 0.0], [1.0, 3.0]]).reshape(2, 1, 1, 2)
    omega = torch.tensor([0.5, 2.0])
    bce = float(sum(F.softplus(-torch.tensor(v)) for v in (-10.0, 0.0, 1.0, 3.0)) / 4)  # −20 clipped to −10
    torch.testing.assert_close(sida_generator_gan_loss(logit, omega, 64), 64 * bce / omega)
    # the clip stops the gradient beyond ±10 (the reference's clamp)
    logit.requires_grad_(True)
    sida_generator_gan_loss(logit, omega, 64).sum().backward()
    assert logit.grad.flatten()[0] == 0 and (logit.grad.flatten()[1:] < 0).all()


def test_sid_term_equals_sid_and_the_gan_term_reaches_x_g_through_the_fake_encoder():
    teacher, fake = _den(0), _den(1)
    x_g = torch.randn(6, 1, 8, 8, requires_grad=True)
    sigma, noise = torch.linspace(0.05, 5.0, 6), torch.randn(6, 1, 8, 8)
    sid, gan, info = sida_generator_loss(x_g, teacher, fake, alpha=1.0, sigma=sigma, noise=noise)
    ref, _ = sid_generator_loss(x_g, teacher, fake, alpha=1.0, sigma=sigma, noise=noise)
    torch.testing.assert_close(sid, ref)
    _, feats = fake.forward_with_features(x_g + sigma.view(-1, 1, 1, 1) * noise, sigma)
    omega = sid_weight(x_g, info["y_real"])
    torch.testing.assert_close(gan, sida_generator_gan_loss(discriminator_logits(feats), omega, 64))
    # the GAN term's gradient w.r.t. x_g is that of the encoder logits: nonzero, and only through f_ψ
    g = torch.autograd.grad(gan.sum(), x_g, retain_graph=True)[0]
    assert g.abs().sum() > 0
    gf = torch.autograd.grad(gan.sum(), list(fake.parameters()), allow_unused=True)
    assert any(t is not None and t.abs().sum() > 0 for t in gf)
    assert all(p.grad is None for p in teacher.parameters())


def test_fake_loss_uses_one_sigma_and_noise_for_real_and_generated():
    fake = _den(1)
    x_g, x_real = torch.randn(4, 1, 8, 8), torch.rand(4, 1, 8, 8) * 2 - 1
    sigma, noise = torch.tensor([0.1, 0.5, 1.0, 3.0]), torch.randn(4, 1, 8, 8)
    edm, disc, info = sida_fake_loss(fake, x_g, x_real, sigma=sigma, noise=noise)
    lam = edm_loss_weight(sigma)
    y = fake(x_g + sigma.view(-1, 1, 1, 1) * noise, sigma)
    torch.testing.assert_close(edm, lam * (y - x_g).pow(2).flatten(1).sum(1))
    lr = discriminator_logits(fake.encoder_features(x_real + sigma.view(-1, 1, 1, 1) * noise, sigma))
    torch.testing.assert_close(info["logit_real"], lr)
    torch.testing.assert_close(disc, sida_discriminator_loss(lr, info["logit_fake"], lam))
    with pytest.raises(FewstepError, match="differ in shape"):
        sida_fake_loss(fake, x_g, x_real[:, :, :4])


def _method(**over):
    cfg = SiDAConfig(**{"generator_start_kimg": 1.0, "gan_start_kimg": 2.0, **over})
    m = SiDA.create(cfg, teacher=_teacher(), dataset=_Data())
    m.batch_size = 8
    m.optimizers = m.build_optimizers()
    return m


def test_schedule_warm_up_then_sid_then_half_sid_plus_gan():
    m = _method()
    batch = (_Data().x[:8], None)
    m.begin_iteration(0, 10**6)
    assert [p.name for p in m.phases()] == ["fake"]  # the generator waits
    m.begin_iteration(1500, 10**6)
    assert [p.name for p in m.phases()] == ["fake", "generator"]
    torch.manual_seed(3)
    only_sid, _ = m.generator_loss(batch)
    m.begin_iteration(2500, 10**6)
    torch.manual_seed(3)
    with_gan, _ = m.generator_loss(batch)
    # same draws: the loss becomes ½(SiD + w·GAN), and the GAN term is positive
    c = m.config
    torch.manual_seed(3)
    x_g, _ = m.generator_step_inputs()
    sid, gan, _ = sida_generator_loss(x_g, m.teacher, m.fake, alpha=c.alpha, t_max=c.t_max)
    scale = c.loss_scale / m.batch_size
    torch.testing.assert_close(only_sid, sid.sum() * scale)
    torch.testing.assert_close(with_gan, 0.5 * (sid.sum() + c.gan_weight * gan.sum()) * scale)
    assert float(gan.detach().min()) > 0


def test_fake_phase_is_clipped_in_units_of_the_unscaled_loss_and_trains_the_discriminator():
    m = _method(fake_grad_clip=0.5)
    phase = m.phases()[0]
    assert phase.grad_clip_value == pytest.approx(0.5 * m.config.loss_scale)
    assert _method(fake_grad_clip=0.0).phases()[0].grad_clip_value is None
    batch = (_Data().x[:8], None)
    loss, stats = phase.loss(batch)
    assert torch.isfinite(loss) and 0 <= stats["disc/accuracy"] <= 1 and stats["disc/bce"] > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.fake.parameters())
    assert all(p.grad is None for p in m.G.parameters())


def test_bad_set_ups_are_clear_errors():
    with pytest.raises(FewstepError, match="guidance"):
        SiDAConfig(guidance_fake=2.0).validate()
    with pytest.raises(FewstepError, match="omega-pool"):
        SiDAConfig(omega_pool=4).validate()
    mlp = {"name": "mlp", "dim": 2, "width": 16, "depth": 2, "emb_channels": 8}
    pts = FewstepModel(EDMPrecond(build_net(mlp)), {
        "type": "denoiser", "net": mlp, "precond": {"name": "edm", "sigma_data": 0.5},
        "data": {"kind": "points", "sample_shape": [2], "num_classes": 0, "name": "8gaussians"}})
    with pytest.raises(FewstepError, match="UNet"):
        SiDA.create(SiDAConfig(), teacher=pts)
    wrong = _Data()
    wrong.x = wrong.x[:, :, :4, :4]
    with pytest.raises(FewstepError, match="--data"):
        SiDA.create(SiDAConfig(), teacher=_teacher(), dataset=wrong)
    with pytest.raises(FewstepError, match="class-conditional.*no labels"):  # real images under random classes
        SiDA.create(SiDAConfig(), teacher=_teacher(num_classes=3), dataset=_Data())
    assert SiDA.uses_data and SiDAConfig().alpha == 1.0 and SiDConfig().alpha == 1.2
    assert DataInfo  # the student is SiD's one-step generator (same export)


def test_cli_distils_a_digits_teacher_with_sida_and_names_its_errors(tmp_path, capsys):
    import json

    from fewstep.cli import main
    from fewstep.model import load_model

    quiet = ["--no-progress", "--snapshot-every-kimg", "100", "--checkpoint-every-kimg", "100"]
    teacher = tmp_path / "teacher"
    assert main(["teacher", "--data", "digits", "--out", str(teacher), "--net", json.dumps(UNET),
                 "--total-kimg", "0.5", "--batch-size", "64", *quiet]) == 0
    out = tmp_path / "sida"
    assert main(["distill", "sida", "--teacher", str(teacher), "--out", str(out), "--total-kimg", "0.64",
                 "--batch-size", "32", "--generator-start-kimg", "0.1", "--gan-start-kimg", "0.3",
                 "--eval-n", "100", *quiet]) == 0
    stats = [json.loads(x) for x in (out / "stats.jsonl").read_text().splitlines()]
    assert all("disc/accuracy" in s for s in stats) and "loss/generator" in stats[-1]
    student = load_model(out)
    assert student.is_generator and student.nfe() == 1 and student.config["provenance"]["method"] == "sida"
    res = student.sample(8, seed=2)
    assert res.x.shape == (8, 1, 8, 8) and torch.isfinite(res.x).all()
    capsys.readouterr()
    assert main(["eval", str(out), "--n", "200"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 1
    # a points teacher has no encoder to read a discriminator from
    pts = tmp_path / "pts"
    assert main(["teacher", "--data", "8gaussians", "--out", str(pts), "--total-kimg", "0.3", "--batch-size", "64",
                 "--net", json.dumps({"name": "mlp", "dim": 2, "width": 16, "depth": 2, "emb_channels": 8}),
                 *quiet]) == 0
    capsys.readouterr()
    assert main(["distill", "sida", "--teacher", str(pts), "--out", str(tmp_path / "bad")]) != 0
    assert "UNet" in capsys.readouterr().err


def test_a_conditional_teachers_generator_batch_carries_the_real_batchs_labels():
    data = _Data()
    data.labels = torch.arange(64) % 3
    m = SiDA.create(SiDAConfig(generator_start_kimg=1.0, gan_start_kimg=2.0), teacher=_teacher(num_classes=3),
                    dataset=data)
    m.batch_size = 8
    labels = torch.tensor([2, 2, 1, 0, 2, 1, 1, 0])
    x_g, got = m.generator_step_inputs((data.x[:8], labels))
    assert torch.equal(got, labels) and x_g.shape == (8, 1, 8, 8) and x_g.requires_grad
    torch.manual_seed(5)
    again, _ = m.generator_step_inputs((data.x[:8], labels))
    torch.manual_seed(5)  # the same draw with other labels is another batch: the labels reach G
    other, _ = m.generator_step_inputs((data.x[:8], torch.zeros(8, dtype=torch.long)))
    assert not torch.allclose(again, other)
    _, drawn = m.generator_step_inputs()  # no batch: labels are drawn, one per sample, in range
    assert drawn.shape == (8,) and int(drawn.min()) >= 0 and int(drawn.max()) < 3
