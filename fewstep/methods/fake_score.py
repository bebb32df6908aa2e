"""Machinery shared by the fake-score family: SiD, Diff-Instruct, DMD (DESIGN §3).

Three denoisers: the frozen teacher f_φ, a fake score f_ψ that tracks the
generator's distribution, and the one-step generator G_θ,
x_g = G_θ(σ_init·z, σ_init). Each iteration first updates f_ψ with the EDM loss
on fresh generated samples (no gradient into G), then G with a method-specific
loss. Subclasses only write that generator loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import require
from ..diffusion.denoiser import append_dims, edm_loss, karras_ramp
from ..diffusion.guidance import CFGDenoiser
from ..errors import FewstepError
from ..model import FewstepModel, one_step_generate
from .base import DataInfo, Method, Phase, initial_network, student_data_info


@dataclass
class FakeScoreConfig:
    """Options shared by SiD, Diff-Instruct and DMD."""

    sigma_init: float = field(default=2.5, metadata={"help": "σ_init of the one-step generator x_g = G(σ_init·z, σ_init)"})
    lr_g: float = field(default=5e-5, metadata={"help": "generator learning rate (reference: 1e-5 on CIFAR-10)"})
    lr_fake: float = field(default=5e-5, metadata={"help": "fake-score learning rate"})
    betas: tuple[float, float] = field(default=(0.0, 0.999), metadata={"help": "Adam betas of both networks"})
    fake_updates: int = field(default=1, metadata={"help": "fake-score updates per generator update"})
    loss_scale: float = field(default=100.0, metadata={"help": "losses are summed and scaled by loss_scale/batch (reference: 100)"})
    p_mean: float = field(default=-1.2, metadata={"help": "ln σ mean of the fake-score EDM loss"})
    p_std: float = field(default=1.2, metadata={"help": "ln σ std of the fake-score EDM loss"})
    t_min: float = field(default=0.0, metadata={"help": "generator σ: t ~ U(t_min, t_max/1000) through the Karras ramp"})
    t_max: float = field(default=800.0, metadata={"help": "generator σ: upper end of t in thousandths (800 → σ ≈ 24.4)"})
    guidance_fake_train: float = field(default=1.0, metadata={"help": "CFG scale κ of the fake network while it trains (SiD-LSG)"})
    guidance_fake: float = field(default=1.0, metadata={"help": "CFG scale κ of the fake network inside the generator loss"})
    guidance_teacher: float = field(default=1.0, metadata={"help": "CFG scale κ of the teacher inside the generator loss"})
    lr_decay_kimg: float = field(default=0.0, metadata={"help": "inverse-sqrt decay of both learning rates after this many kimg: lr·(kimg/this)^-½ (EDM2); 0 = constant (the reference)"})
    dropout: float | None = field(default=None, metadata={"help": "dropout rate of the generator and the fake score while they train; unset keeps the rate the teacher was trained with (the reference)"})
    t_max_end: float | None = field(default=None, metadata={"help": "anneal the generator's t_max to this value (large σ first for the layout, then small σ for the detail); unset = t_max throughout (the reference)"})
    t_max_anneal_kimg: tuple[float, float] = field(default=(0.0, 0.0), metadata={"help": "[start, end] kimg of the linear t_max → t_max_end ramp, e.g. 150,150 (start = end: a switch)"})
    fake_eval: bool = field(default=False, metadata={"help": "run the fake score in eval mode (dropout off, like the teacher) inside the generator loss, as the reference does; off (default for now): train mode, which the committed benchmarks ran"})

    def validate(self) -> None:
        require(self.sigma_init > 0, f"sigma_init must be > 0, got {self.sigma_init}")
        require(self.lr_g > 0 and self.lr_fake > 0, "learning rates must be > 0")
        require(self.fake_updates >= 1, f"fake_updates must be >= 1, got {self.fake_updates}")
        require(0 <= self.t_min * 1000 <= self.t_max <= 1000,
                f"need 0 <= t_min·1000 <= t_max <= 1000, got t_min={self.t_min}, t_max={self.t_max}")
        require(self.loss_scale > 0, "loss_scale must be > 0")
        require(self.lr_decay_kimg >= 0, f"lr_decay_kimg must be >= 0 (0 = constant), got {self.lr_decay_kimg}")
        require(self.dropout is None or 0 <= self.dropout < 1,
                f"dropout must be in [0, 1) (or unset to keep the teacher's), got {self.dropout}")
        require(self.t_max_end is None or self.t_min * 1000 <= self.t_max_end <= 1000,
                f"t_max_end must be in [t_min·1000, 1000] (or unset), got {self.t_max_end}")
        a = tuple(self.t_max_anneal_kimg)
        require(len(a) == 2 and 0 <= a[0] <= a[1], "t_max_anneal_kimg must be [start, end] kimg with "
                f"0 <= start <= end, got {list(a)}")


def annealed_t_max(kimg: float, t_max: float, t_max_end: float | None, start_kimg: float,
                   end_kimg: float) -> float:
    """t_max until ``start_kimg``, then linear to ``t_max_end`` at ``end_kimg``, then ``t_max_end``."""
    if t_max_end is None or kimg <= start_kimg:
        return t_max
    if kimg >= end_kimg:
        return t_max_end
    return t_max + (t_max_end - t_max) * (kimg - start_kimg) / (end_kimg - start_kimg)


def generator_sigma(n: int, t_min: float = 0.0, t_max: float = 800.0, *, device=None) -> torch.Tensor:
    """σ = Karras ramp of t ~ U(t_min, t_max/1000) (DESIGN §3, SiD step 2)."""
    t = t_min + (t_max / 1000.0 - t_min) * torch.rand(n, device=device)
    return karras_ramp(t)


def generator_draws(x_g: torch.Tensor, sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                    t_min: float = 0.0, t_max: float = 800.0):
    """``(σ, ε)`` for a generator-loss batch: σ from :func:`generator_sigma` and ε ~ N(0, I), unless given."""
    if sigma is None:
        sigma = generator_sigma(x_g.shape[0], t_min, t_max, device=x_g.device)
    if noise is None:
        noise = torch.randn_like(x_g)
    return sigma, noise


def guided(den: nn.Module, scale: float, num_classes: int) -> nn.Module:
    """``den`` under classifier-free guidance ``scale`` (identity for unconditional nets or κ = 1)."""
    if num_classes <= 0 or scale == 1.0:
        return den
    return CFGDenoiser(den, scale, null_label=num_classes)


def denoise_both(x_g: torch.Tensor, teacher: nn.Module, fake: nn.Module, labels, sigma: torch.Tensor,
                 noise: torch.Tensor, *, through_networks: bool):
    """x_t = x_g + σ·ε and (f_φ(x_t, σ), f_ψ(x_t, σ)).

    ``through_networks`` keeps the gradient from both outputs back to x_g (SiD);
    otherwise neither network is differentiated (Diff-Instruct, DMD).
    """
    x_in = x_g if through_networks else x_g.detach()
    with torch.set_grad_enabled(through_networks and torch.is_grad_enabled()):
        x_t = x_in + append_dims(sigma, x_g.ndim) * noise
        return teacher(x_t, sigma, labels), fake(x_t, sigma, labels)


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """Per-sample mask of rows that are finite in every tensor (NaN samples are dropped)."""
    mask = None
    for t in tensors:
        m = torch.isfinite(t.detach()).flatten(1).all(1)
        mask = m if mask is None else mask & m
    return mask


def keep_finite_rows(x_g: torch.Tensor, *outputs: torch.Tensor) -> torch.Tensor:
    """The rows of a generator batch finite in ``x_g`` and in every output (:func:`finite_rows`). A dropped row's
    gradient would be 0·NaN = NaN and reach every weight of G through its backward (and the loop would zero the
    whole step): its gradient at x_g is zeroed by a hook."""
    keep = finite_rows(x_g, *outputs)
    if not keep.all() and x_g.requires_grad:
        mask = append_dims(keep, x_g.ndim)
        x_g.register_hook(lambda g: torch.where(mask, g, torch.zeros_like(g)))
    return keep


@contextlib.contextmanager
def eval_mode(net: nn.Module):
    """``net`` in eval mode (dropout off) inside the block, its previous mode restored after."""
    was = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was)


def set_dropout(net: nn.Module, p: float) -> None:
    """Set the rate of every dropout layer of ``net`` to ``p`` (weights untouched)."""
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


class FakeScoreMethod(Method):
    """Base of the fake-score family; subclasses implement :meth:`generator_loss`."""

    Config = FakeScoreConfig
    uses_data = False
    train_defaults = {"ema_halflife_kimg": 20.0, "ema_rampup": 0.5, "snapshot_every_kimg": 20.0,
                      "checkpoint_every_kimg": 20.0}

    def __init__(self, config, teacher: nn.Module, generator: nn.Module, fake: nn.Module, data_info: DataInfo):
        super().__init__(config)
        self.teacher = teacher
        self.G = generator
        self.fake = fake
        self.nets = {"generator": generator, "fake": fake}
        self.frozen = {"teacher": teacher}
        self.ema_net = "generator"
        self.data_info = data_info
        self._kimg = 0.0  # images seen, set by begin_iteration (the t_max schedule follows it)

    @classmethod
    def create(cls, config, *, teacher: FewstepModel, dataset=None, init: FewstepModel | None = None):
        """Generator and fake score both start from the teacher's weights (or from ``init``).

        An ``init`` that is a one-step generator (a distilled student, e.g. SiD's for SiD²A)
        starts the generator only: the fake score then starts from the teacher, as a score
        network must (the reference's SiD²A does the same).
        """
        G = initial_network(cls.name, teacher, init).train().requires_grad_(True)
        fake_init = None if init is not None and init.is_generator else init
        fake = initial_network(cls.name, teacher, fake_init).train().requires_grad_(True)
        if config.dropout is not None:
            set_dropout(G, config.dropout)
            set_dropout(fake, config.dropout)
        guidance = {k: getattr(config, k) for k in ("guidance_fake_train", "guidance_fake", "guidance_teacher")
                    if getattr(config, k) != 1.0}
        if guidance and teacher.data_info.num_classes == 0:
            flags = ", ".join("--" + k.replace("_", "-") + f" {v:g}" for k, v in guidance.items())
            raise FewstepError(f"classifier-free guidance ({flags}) needs a class-conditional teacher; "
                               "this one is unconditional")
        return cls(config, teacher.denoiser, G, fake, student_data_info(teacher, init))

    # ---- pieces ---------------------------------------------------------------------------
    def generate(self, n: int, labels=None, *, grad: bool) -> torch.Tensor:
        """x_g = G(σ_init·z, σ_init) (G in train mode: the fake score learns the distribution of the
        x_g that the generator loss sees; the reference samples this batch in eval mode, which was
        worse in a digits trial, see benchmarks/sid.py)."""
        z = torch.randn((n,) + tuple(self.data_info.sample_shape), device=self.device)
        with torch.set_grad_enabled(grad):
            return one_step_generate(self.G, z, self.config.sigma_init, labels)

    def build_optimizers(self):
        c = self.config
        return {"fake": torch.optim.Adam(self.fake.parameters(), lr=c.lr_fake, betas=tuple(c.betas)),
                "generator": torch.optim.Adam(self.G.parameters(), lr=c.lr_g, betas=tuple(c.betas))}

    def lr_factor(self, nimg: int) -> float:
        """1 until ``lr_decay_kimg``, then (kimg / lr_decay_kimg)^-½ (EDM2's inverse-square-root decay)."""
        ref = self.config.lr_decay_kimg * 1000
        return 1.0 if ref <= 0 else min(1.0, (ref / max(nimg, 1)) ** 0.5)

    @property
    def t_max_now(self) -> float:
        """The generator's t_max at this iteration (``t_max`` unless annealed, see :func:`annealed_t_max`)."""
        c = self.config
        return annealed_t_max(self._kimg, c.t_max, c.t_max_end, *c.t_max_anneal_kimg)

    def begin_iteration(self, nimg: int, total_nimg: int) -> None:
        self._kimg = nimg / 1000.0
        f = self.lr_factor(nimg)
        for name, lr in (("fake", self.config.lr_fake), ("generator", self.config.lr_g)):
            for g in self.optimizers[name].param_groups:
                g["lr"] = lr * f

    def fake_loss(self, batch):
        """Step 1: EDM loss of f_ψ on fresh generated samples (no gradient into G)."""
        c, n = self.config, self.batch_size
        labels = self.draw_labels(n)
        x_g = self.generate(n, labels, grad=False)
        keep = finite_rows(x_g)
        dropped = int((~keep).sum())
        x_g = x_g[keep]
        labels = labels[keep] if labels is not None else None
        fake = guided(self.fake, c.guidance_fake_train, self.data_info.num_classes)
        per = edm_loss(fake, x_g, labels, p_mean=c.p_mean, p_std=c.p_std, reduce=False)
        return per.sum() * (c.loss_scale / n), {"nan_samples/fake": dropped}

    def generator_step_inputs(self, batch=None):
        """A fresh generated batch x_g (with gradient into θ) and its labels (``batch``: the
        iteration's data batch, for methods that read one)."""
        labels = self.draw_labels(self.batch_size)
        x_g = self.generate(self.batch_size, labels, grad=True)
        return x_g, labels

    def phases(self):
        return [Phase("fake", "fake", self.fake_loss, repeats=self.config.fake_updates),
                Phase("generator", "generator", self._generator_phase)]

    def _generator_phase(self, batch):
        # only θ is updated: no parameter gradients for f_ψ (its input gradient still flows);
        # --fake-eval: f_ψ in eval mode, like the frozen teacher, so y_r − y_f carries no dropout noise
        self.fake.requires_grad_(False)
        try:
            with eval_mode(self.fake) if self.config.fake_eval else contextlib.nullcontext():
                return self.generator_loss(batch)
        finally:
            self.fake.requires_grad_(True)

    def per_sample_loss(self, x_g, teacher, fake, labels):  # pragma: no cover - abstract
        """The method's generator loss of a batch: ``(per-sample loss [N], info with y_real/y_fake)``."""
        raise NotImplementedError

    def generator_loss(self, batch):
        """Step 2: the method's loss on a fresh batch x_g; NaN samples dropped (and counted)."""
        c = self.config
        x_g, labels = self.generator_step_inputs(batch)
        k = self.data_info.num_classes
        per, info = self.per_sample_loss(x_g, guided(self.teacher, c.guidance_teacher, k),
                                         guided(self.fake, c.guidance_fake, k), labels)
        keep = keep_finite_rows(x_g, info["y_real"], info["y_fake"])
        loss = per[keep].sum() * (c.loss_scale / self.batch_size)
        info = {"nan_samples/generator": int((~keep).sum())}
        if c.t_max_end is not None:  # the annealed σ range, in the stats
            info["t_max"] = self.t_max_now
        return loss, info

    def export_config(self) -> dict:
        from ..model import network_spec

        return {"format": "fewstep.model", "version": 1, "type": "generator", **network_spec(self.G),
                "data": self.data_info.to_dict(),
                "sampling": {"sampler": "one-step", "sigma_init": self.config.sigma_init}}
