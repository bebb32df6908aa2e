"""A residual MLP backbone for point clouds (and any small flattened input).

``F(x_in [N, *shape], c_noise [N], labels) → [N, *shape]``: the input is flattened
to ``dim`` values, projected to ``width``, passed through ``depth`` pre-norm
residual blocks whose normalised activations are scaled and shifted by the
noise/class embedding (adaptive norm), and projected back by a zero-initialised
layer, so a fresh ``EDMPrecond(MLP(...))`` starts as ``c_skip·x``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import require
from ..errors import FewstepError
from .embedding import EMBEDDINGS, ConditionEmbedding
from .layers import group_norm

NORMS = ("layer", "group", "none")


@dataclass
class MLPConfig:
    """Config of :class:`MLP` (round-trips through ``fewstep.config.to_dict/from_dict``)."""

    dim: int = 2                 # values per sample (D for points [N, D])
    width: int = 256             # hidden width
    depth: int = 4               # number of residual blocks
    emb_channels: int = 128      # width of the noise embedding before its MLP
    embedding: str = "positional"  # "positional" (EDM DDPM++) | "fourier"
    fourier_scale: float = 16.0
    num_classes: int = 0         # 0 = unconditional; K adds K+1 label vectors (K = no label)
    dropout: float = 0.0
    norm: str = "layer"          # "layer" | "group" | "none"
    guidance_embedding: bool = False  # also takes the guidance scale κ (a guidance-distilled net)
    path_embedding: bool = False  # also takes the noise level σ_p of a point of its sampling path (BOOT)
    name: str = "mlp"

    def validate(self) -> None:
        require(self.name == "mlp", f"MLPConfig.name must be 'mlp', got {self.name!r}")
        for k in ("dim", "width", "depth", "emb_channels"):
            require(getattr(self, k) >= 1, f"MLPConfig.{k} must be >= 1, got {getattr(self, k)}")
        require(self.emb_channels % 2 == 0, f"MLPConfig.emb_channels must be even, got {self.emb_channels}")
        require(self.embedding in EMBEDDINGS, f"MLPConfig.embedding must be one of {EMBEDDINGS}, "
                                              f"got {self.embedding!r}")
        require(self.fourier_scale > 0, f"MLPConfig.fourier_scale must be > 0, got {self.fourier_scale}")
        require(self.num_classes >= 0, f"MLPConfig.num_classes must be >= 0, got {self.num_classes}")
        require(0.0 <= self.dropout < 1.0, f"MLPConfig.dropout must be in [0, 1), got {self.dropout}")
        require(self.norm in NORMS, f"MLPConfig.norm must be one of {NORMS}, got {self.norm!r}")


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(ch, elementwise_affine=False)
    if kind == "group":
        return group_norm(ch, affine=False)
    return nn.Identity()


class MLPBlock(nn.Module):
    """``h + W₂·drop(SiLU(W₁·SiLU(norm(h)·(1 + scale) + shift)))`` with (scale, shift) from the embedding."""

    def __init__(self, width: int, emb_ch: int, norm: str, dropout: float):
        super().__init__()
        self.norm = _norm(norm, width)
        self.affine = nn.Linear(emb_ch, 2 * width)
        self.fc0 = nn.Linear(width, width)
        self.fc1 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(emb).chunk(2, dim=1)
        y = F.silu(self.norm(h) * (1 + scale) + shift)
        y = self.fc1(self.dropout(F.silu(self.fc0(y))))
        return h + y


class MLP(nn.Module):
    """Residual MLP backbone ``forward(x_in, c_noise, labels=None)`` (see module docstring)."""

    def __init__(self, config: MLPConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = MLPConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either an MLPConfig or keyword options, not both")
        config.validate()
        self.config = config
        self.num_classes = config.num_classes
        c = config
        self.embed = ConditionEmbedding(c.emb_channels, c.width, embedding=c.embedding,
                                        fourier_scale=c.fourier_scale, num_classes=c.num_classes,
                                        guidance=c.guidance_embedding, path=c.path_embedding)
        self.guidance_embedding = c.guidance_embedding
        self.path_embedding = c.path_embedding
        self.fc_in = nn.Linear(c.dim, c.width)
        self.blocks = nn.ModuleList(MLPBlock(c.width, c.width, c.norm, c.dropout) for _ in range(c.depth))
        self.norm_out = _norm(c.norm, c.width)
        self.fc_out = nn.Linear(c.width, c.dim)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor,
                labels: torch.Tensor | None = None, guidance=None, path=None) -> torch.Tensor:
        n = x_in.shape[0]
        flat = x_in.reshape(n, -1)
        if flat.shape[1] != self.config.dim:
            raise FewstepError(f"MLP expects {self.config.dim} values per sample, got input of shape "
                               f"{tuple(x_in.shape)}; set MLPConfig.dim to the data dimension")
        emb = self.embed(c_noise.reshape(n), labels, guidance, path)
        h = self.fc_in(flat.to(self.fc_in.weight.dtype))
        for block in self.blocks:
            h = block(h, emb)
        out = self.fc_out(F.silu(self.norm_out(h)))
        return out.reshape(x_in.shape)
