"""Adversarial Score identity Distillation (SiDA; Zhou et al., ICLR 2025), DESIGN §3 "SiD+GAN".

SiD plus a discriminator that costs no extra network: the fake score's encoder
(the UNet's down path) read as a spatial logit map, ``logits = mean over channels``.
It sees real images, so SiDA is *not* data-free: it trains on the teacher's dataset.

Fake-network update (one pass of f_ψ on x_g + σε, one encoder pass on x_real + σε,
the same σ ~ log-normal and ε for both; λ(σ) = EDM weight):

    L_ψ = Σ_i λ(σ_i)·‖f_ψ(x_g,i + σ_i ε_i) − x_g,i‖²  +  w_D·Σ_i λ(σ_i)·(BCE(ℓ_real, 1) + BCE(ℓ_fake, 0))/2

Generator update, on SiD's batch (σ from the Karras ramp, ω = SiD's per-sample weight):

    L_θ = Σ_i SiD_i  +  w_G·Σ_i D·BCE(clip(ℓ_fake, ±10), 1)/ω_i            (D = dimensions per sample)

As in the reference code, each BCE is the mean over the whole batch's logit map
(so λ(σ_i) and 1/ω_i scale the batch's BCE, not the sample's own), the GAN term
enters as ½(SiD + GAN) once it is on, the generator waits while the fake network
and discriminator warm up, and the fake network's gradient can be clipped element-wise
(``fake_grad_clip``; the reference's 1 is off by default: in 28-minute digits trials it left
the FD at 0.87 instead of 0.78 at 276 kimg). The two warm-ups default to a tenth of the
reference's (10 and 20 kimg instead of 100 and 200), which are sized for runs of 100 Mimg,
not for a CPU's few hundred kimg.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import require
from ..diffusion.denoiser import append_dims, edm_loss_weight, sample_edm_sigma
from ..errors import FewstepError
from .base import Phase, register_method
from .fake_score import finite_rows, generator_draws
from .sid import SiD, SiDConfig, sid_loss, sid_weight


def discriminator_logits(features: torch.Tensor) -> torch.Tensor:
    """The discriminator's logit map ``[N, 1, h, w]``: the encoder features' mean over channels."""
    return features.mean(dim=1, keepdim=True)


def sida_discriminator_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor,
                            weight: torch.Tensor) -> torch.Tensor:
    """Per-sample discriminator loss ``weight_i · (BCE(real → 1) + BCE(fake → 0)) / 2`` ``[N]``;
    each BCE is the mean over the batch's whole logit map (the reference's reduction)."""
    bce_real = F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
    bce_fake = F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
    return weight.reshape(-1) * (bce_real + bce_fake) / 2


def sida_generator_gan_loss(logit_fake: torch.Tensor, omega: torch.Tensor, dims: int) -> torch.Tensor:
    """Per-sample non-saturating GAN loss of the generator ``dims · BCE(clip(ℓ, ±10), 1) / ω_i`` ``[N]``
    (``dims``: dimensions per sample; the BCE is the batch mean, as in the reference)."""
    logit = logit_fake.clamp(-10, 10)
    bce = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
    return dims * bce / omega.reshape(-1)


def sida_fake_loss(fake, x_g: torch.Tensor, x_real: torch.Tensor, labels=None, *, sigma=None, noise=None,
                   p_mean: float = -1.2, p_std: float = 1.2):
    """The fake network's two per-sample losses on a generated and a real batch, a pure function.

    Returns ``(edm [N], disc [N], info)``: the EDM denoising loss of f_ψ on x_g and the
    discriminator loss of its encoder (real vs generated, same σ and ε). ``fake`` is an
    :class:`~fewstep.diffusion.denoiser.EDMPrecond` around a backbone with encoder features.
    """
    n = x_g.shape[0]
    if x_real.shape != x_g.shape:
        raise FewstepError(f"real batch {tuple(x_real.shape)} and generated batch {tuple(x_g.shape)} differ in shape")
    if sigma is None:
        sigma = sample_edm_sigma(n, p_mean, p_std, device=x_g.device)
    if noise is None:
        noise = torch.randn_like(x_g)
    s = append_dims(sigma, x_g.ndim)
    lam = edm_loss_weight(sigma, fake.sigma_data)
    y_fake, feats = fake.forward_with_features(x_g + s * noise, sigma, labels)
    edm = lam * (y_fake - x_g).pow(2).flatten(1).sum(1)
    logit_fake = discriminator_logits(feats)
    logit_real = discriminator_logits(fake.encoder_features(x_real + s * noise, sigma, labels))
    disc = sida_discriminator_loss(logit_real, logit_fake, lam)
    return edm, disc, {"sigma": sigma, "logit_real": logit_real, "logit_fake": logit_fake}


def sida_generator_loss(generator_out: torch.Tensor, teacher, fake, labels=None, *, alpha: float = 1.0,
                        sigma=None, noise=None, t_max: float = 800.0, t_min: float = 0.0):
    """SiD loss and the generator's GAN loss of a batch x_g, a pure function.

    Returns ``(sid [N], gan [N], info)``. Gradients reach x_g through the explicit x_g and
    through both networks' inputs (the GAN term through the fake network's encoder).
    """
    x_g = generator_out
    sigma, noise = generator_draws(x_g, sigma, noise, t_min, t_max)
    x_t = x_g + append_dims(sigma, x_g.ndim) * noise
    y_real = teacher(x_t, sigma, labels)
    y_fake, feats = fake.forward_with_features(x_t, sigma, labels)
    omega = sid_weight(x_g, y_real)
    sid = sid_loss(x_g, y_real, y_fake, alpha, omega).flatten(1).sum(1)
    logit = discriminator_logits(feats)
    gan = sida_generator_gan_loss(logit, omega, x_g[0].numel())
    return sid, gan, {"sigma": sigma, "y_real": y_real, "y_fake": y_fake, "logit_fake": logit}


@dataclass
class SiDAConfig(SiDConfig):
    alpha: float = field(default=1.0, metadata={"help": "α of the SiD term (SiDA's reference: 1.0)"})
    gan_weight: float = field(default=1e-4, metadata={"help": "weight of the generator's GAN term relative to its SiD term (reference: 0.01/100)"})
    disc_weight: float = field(default=1.0, metadata={"help": "weight of the discriminator loss relative to the fake network's EDM loss (reference: 1)"})
    fake_grad_clip: float = field(default=0.0, metadata={"help": "clip each element of the fake network's gradient to ±this, in units of the unscaled loss (reference: 1; 0 = off, the default: on digits the clip slowed the late descent)"})
    generator_start_kimg: float = field(default=10.0, metadata={"help": "the generator waits this many kimg while the fake network and the discriminator warm up (reference: 100, for runs of 100 Mimg)"})
    gan_start_kimg: float = field(default=20.0, metadata={"help": "the GAN term joins the generator loss, as ½(SiD + GAN), from this many kimg (reference: 200, for runs of 100 Mimg)"})

    def validate(self) -> None:
        super().validate()
        require(self.gan_weight >= 0 and self.disc_weight >= 0,
                f"gan_weight and disc_weight must be >= 0, got {self.gan_weight}, {self.disc_weight}")
        require(self.fake_grad_clip >= 0, f"fake_grad_clip must be >= 0 (0 = off), got {self.fake_grad_clip}")
        require(0 <= self.generator_start_kimg and 0 <= self.gan_start_kimg,
                "generator_start_kimg and gan_start_kimg must be >= 0")
        require(self.guidance_fake == 1.0 and self.guidance_fake_train == 1.0,
                "SiDA's discriminator is the fake network's own encoder: guidance scales for the fake "
                "network are not supported (leave --guidance-fake and --guidance-fake-train at 1)")
        require(self.omega_pool == 1 and not self.antithetic,
                "SiDA uses SiD's per-sample ω and plain batches: leave --omega-pool 1 and --antithetic off")


@register_method
class SiDA(SiD):
    """Adversarial SiD: SiD plus a GAN loss whose discriminator is the fake network's encoder.

    Trains on the teacher's dataset (real images for the discriminator); one step.
    """

    name = "sida"
    Config = SiDAConfig
    uses_data = True
    summary = "Adversarial SiD (SiD + GAN on the fake network's encoder; uses real images)"

    @classmethod
    def create(cls, config, *, teacher, dataset=None, init=None):
        method = super().create(config, teacher=teacher, dataset=dataset, init=init)
        backbone = getattr(method.fake, "net", None)
        if not hasattr(backbone, "encoder_features"):
            raise FewstepError(
                f"SiDA reads its discriminator from the fake network's encoder, but this teacher's backbone "
                f"({type(backbone or method.fake).__name__}) has none: SiDA needs a fewstep UNet teacher; use `sid` instead")
        if dataset is not None and tuple(dataset.x.shape[1:]) != tuple(method.data_info.sample_shape):
            raise FewstepError(f"the real images have shape {tuple(dataset.x.shape[1:])} but the teacher makes "
                               f"{tuple(method.data_info.sample_shape)}: pass the teacher's dataset with --data")
        if dataset is not None and method.data_info.num_classes > 0 and dataset.labels is None:
            raise FewstepError(f"this teacher is class-conditional ({method.data_info.num_classes} classes) but the "
                               "real images have no labels: SiDA's discriminator would see them under random "
                               "classes; pass the labelled dataset the teacher was trained on with --data")
        return method

    def phases(self):
        c = self.config
        clip = c.fake_grad_clip * c.loss_scale if c.fake_grad_clip > 0 else None
        fake = Phase("fake", "fake", self.fake_loss, repeats=c.fake_updates, grad_clip_value=clip)
        if self._kimg < c.generator_start_kimg:  # warm-up: only the fake network / discriminator train
            return [fake]
        return [fake, Phase("generator", "generator", self._generator_phase)]

    def _real(self, batch):
        x_real, labels = batch
        if self.data_info.num_classes == 0:
            labels = None
        return x_real.to(self.device), (labels.to(self.device) if labels is not None else None)

    def fake_loss(self, batch):
        """EDM loss of f_ψ on generated samples + its encoder's discriminator loss, real vs generated."""
        c, n = self.config, self.batch_size
        x_real, labels = self._real(batch)
        labels = labels if labels is not None else self.draw_labels(n)
        x_g = self.generate(n, labels, grad=False)
        keep = finite_rows(x_g)
        dropped = int((~keep).sum())
        x_g, x_real = x_g[keep], x_real[keep]
        labels = labels[keep] if labels is not None else None
        edm, disc, info = sida_fake_loss(self.fake, x_g, x_real, labels, p_mean=c.p_mean, p_std=c.p_std)
        loss = (edm.sum() + c.disc_weight * disc.sum()) * (c.loss_scale / n)
        with torch.no_grad():  # the discriminator's unweighted BCE and its accuracy, for the log
            lr_, lf = info["logit_real"], info["logit_fake"]
            bce = sida_discriminator_loss(lr_, lf, torch.ones(1, device=lr_.device))
            acc = 0.5 * ((lr_ > 0).float().mean() + (lf < 0).float().mean())
        return loss, {"nan_samples/fake": dropped, "disc/bce": float(bce), "disc/accuracy": float(acc)}

    def generator_step_inputs(self, batch=None):
        """A fresh generated batch; a conditional teacher's labels are the real batch's (as in the reference)."""
        labels = self._real(batch)[1] if batch is not None else None
        if labels is None:
            labels = self.draw_labels(self.batch_size)
        return self.generate(self.batch_size, labels, grad=True), labels

    def per_sample_loss(self, x_g, teacher, fake, labels):
        c = self.config
        sid, gan, info = sida_generator_loss(x_g, teacher, fake, labels, alpha=c.alpha, t_min=c.t_min,
                                             t_max=self.t_max_now)
        if self._kimg >= c.gan_start_kimg:
            return 0.5 * (sid + c.gan_weight * gan), info
        return sid, info
