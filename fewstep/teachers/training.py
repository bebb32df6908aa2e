"""Teacher training: the EDM denoising loss (DESIGN §1) as a method of the shared loop."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import require
from ..diffusion.denoiser import EDMPrecond, edm_loss
from ..methods.base import DataInfo, Method, Phase, register_method


@dataclass
class TeacherConfig:
    net: dict = field(default_factory=dict, metadata={"help": "backbone config (fewstep.nets); empty = the dataset's preset"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    lr_rampup_kimg: float = field(default=2.0, metadata={"help": "linear learning-rate warm-up (kimg)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    p_mean: float = field(default=-1.2, metadata={"help": "mean of ln σ in training (EDM)"})
    p_std: float = field(default=1.2, metadata={"help": "std of ln σ in training (EDM)"})
    sigma_data: float = field(default=0.5, metadata={"help": "σ_data of EDM preconditioning"})
    label_dropout: float = field(default=0.1, metadata={"help": "probability of the null label (classifier-free guidance), conditional nets only"})

    def validate(self) -> None:
        for k in ("lr", "lr_rampup_kimg", "p_mean", "p_std", "sigma_data"):
            require(math.isfinite(getattr(self, k)), f"{k} must be a finite number, got {getattr(self, k)}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.p_std > 0, f"p_std must be > 0, got {self.p_std}")
        require(0 <= self.label_dropout < 1, f"label_dropout must be in [0, 1), got {self.label_dropout}")
        require(self.sigma_data > 0, f"sigma_data must be > 0, got {self.sigma_data}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"betas must be two Adam betas in [0, 1), got {list(self.betas)}")


def drop_labels(labels: torch.Tensor | None, p: float, null_label: int) -> torch.Tensor | None:
    """Replace each label by the null label with probability ``p`` (classifier-free guidance training)."""
    if labels is None or p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


@register_method
class EDMTeacher(Method):
    """Train a denoiser with the EDM loss λ(σ)‖D(x_0+σε, σ) − x_0‖², ln σ ~ N(P_mean, P_std²)."""

    name = "teacher"
    Config = TeacherConfig
    uses_data = True
    summary = "train a diffusion teacher with the EDM loss"

    def __init__(self, config: TeacherConfig, data_info: DataInfo):
        super().__init__(config)
        from ..nets.build import build_net

        self.data_info = data_info
        self.denoiser = EDMPrecond(build_net(config.net), config.sigma_data)
        self.nets = {"denoiser": self.denoiser}
        self.ema_net = "denoiser"
        self._nimg = 0

    def build_optimizers(self):
        c = self.config
        return {"denoiser": torch.optim.Adam(self.denoiser.parameters(), lr=c.lr, betas=tuple(c.betas))}

    def begin_iteration(self, nimg: int, total_nimg: int) -> None:
        ramp = min(nimg / max(self.config.lr_rampup_kimg * 1000, 1e-8), 1.0)
        for g in self.optimizers["denoiser"].param_groups:
            g["lr"] = self.config.lr * max(ramp, 1e-3) if self.config.lr_rampup_kimg > 0 else self.config.lr

    def loss(self, batch):
        x0, labels = batch
        labels = drop_labels(labels, self.config.label_dropout, self.data_info.num_classes) \
            if self.data_info.num_classes else None
        loss = edm_loss(self.denoiser, x0, labels, p_mean=self.config.p_mean, p_std=self.config.p_std,
                        sigma_data=self.config.sigma_data)
        return loss, {}

    def phases(self):
        return [Phase("denoiser", "denoiser", self.loss)]

    def export_config(self) -> dict:
        from ..model import network_spec

        return {"format": "fewstep.model", "version": 1, "type": "denoiser", **network_spec(self.denoiser),
                "data": self.data_info.to_dict(),
                "sampling": {"sampler": "heun", "steps": 18, "schedule": "karras"}}
