"""Noise-level and class embeddings shared by the backbones.

Backbones receive ``c_noise = ¼ ln σ`` (EDM). It is embedded either with EDM's
DDPM++ sinusoidal ``positional`` embedding or with random ``fourier``
features (NCSN++ style, frequencies ~ N(0, scale²), stored as a buffer so they
are part of the checkpoint). A two-layer MLP then maps the embedding to the
width used by the blocks. Class labels use ``K + 1`` learned vectors; index
``K`` is the "no label" vector used for classifier-free guidance and whenever
``labels`` is ``None``.

A *guidance-conditioned* net (``guidance_embedding``, made by guidance
distillation, Meng et al. 2023) also takes the guidance scale κ: the positional
embedding of w = κ − 1 through a zero-initialised linear layer is added to the
noise embedding, so a fresh guidance input leaves the network's output unchanged
(the student starts as its teacher's conditional denoiser).

A *path-conditioned* net (``path_embedding``, a BOOT student, Gu et al. 2023)
also takes the noise level σ_p of the point of its sampling path it is asked
for: ln(1 + σ_p/σ_d) (0 at the data end, finite there) is embedded the same
way, through its own zero-initialised linear layer. No σ_p given means σ_p = 0,
the path's data end, so such a net is a one-step generator when called plainly.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import FewstepError

EMBEDDINGS = ("positional", "fourier")


class PositionalEmbedding(nn.Module):
    """EDM's sinusoidal embedding: ``[cos(c·f_i), sin(c·f_i)]``, ``f_i = (1/max_positions)^(i/(h−1))``."""

    def __init__(self, channels: int, max_positions: int = 10_000):
        super().__init__()
        half = channels // 2
        freqs = (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = c.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2π c·f_i), sin(2π c·f_i)]``, ``f_i ~ N(0, scale²)`` (fixed)."""

    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = (2 * math.pi) * c.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class ScalarInput(nn.Linear):
    """An extra scalar input of a network: the positional embedding of the scalar through a zero-initialised
    linear layer (so a net given one computes what it did before until trained). Its parameters are the
    layer's own, ``weight`` and ``bias``."""

    def __init__(self, channels: int):
        super().__init__(channels, channels)
        self.freqs = PositionalEmbedding(channels)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return super().forward(self.freqs(c))


class ConditionEmbedding(nn.Module):
    """``(c_noise [N], labels [N] | None) → emb [N, out_channels]``.

    The noise embedding (``channels`` wide) plus an optional class embedding goes
    through ``Linear → SiLU → Linear → SiLU``.
    """

    def __init__(self, channels: int, out_channels: int, *, embedding: str = "positional",
                 fourier_scale: float = 16.0, num_classes: int = 0, guidance: bool = False,
                 path: bool = False):
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise FewstepError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        self.num_classes = int(num_classes)
        self.noise = (PositionalEmbedding(channels) if embedding == "positional"
                      else FourierEmbedding(channels, fourier_scale))
        self.label = nn.Embedding(self.num_classes + 1, channels) if self.num_classes else None
        self.guidance = ScalarInput(channels) if guidance else None
        self.path = ScalarInput(channels) if path else None
        self.layer0 = nn.Linear(channels, out_channels)
        self.layer1 = nn.Linear(out_channels, out_channels)

    def forward(self, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, path: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.noise(c_noise.reshape(-1))
        if self.label is not None:
            emb = emb + self.label(resolve_labels(labels, self.num_classes, emb.shape[0], emb.device))
        if self.guidance is not None:  # w = κ − 1; no κ given = κ 1, the plain conditional prediction
            w = torch.zeros_like(emb[:, 0]) if guidance is None else resolve_guidance(guidance, emb.shape[0]) - 1
            emb = emb + self.guidance(w.to(emb.device))
        elif guidance is not None:
            raise FewstepError("this network has no guidance input (it was not made by guidance distillation): "
                               "sample it with classifier-free guidance (CFGDenoiser, `--guidance`) instead")
        if self.path is not None:  # σ_p = 0 (the data end) unless given
            sp = torch.zeros_like(emb[:, 0]) if path is None else resolve_path(path, emb.shape[0]).to(emb.device)
            emb = emb + self.path(torch.log1p(sp / PATH_SIGMA_DATA))
        elif path is not None:
            raise FewstepError("this network has no path input (it was not made by BOOT): it takes x and σ only")
        emb = F.silu(self.layer0(emb.to(self.layer0.weight.dtype)))
        return F.silu(self.layer1(emb))


PATH_SIGMA_DATA = 0.5  # σ_d of the path coordinate ln(1 + σ_p/σ_d)


def _per_sample(value, n: int, what: str) -> torch.Tensor:
    """A number or a ``[n]`` tensor as a float tensor ``[n]`` (``what`` names it in the error)."""
    v = torch.as_tensor(value, dtype=torch.float32)
    if v.ndim == 0:
        v = v.expand(n)
    if v.shape != (n,):
        raise FewstepError(f"{what} must be a number or have shape [{n}] (one per sample), got {tuple(v.shape)}")
    return v


def resolve_path(path, n: int) -> torch.Tensor:
    """A path noise level σ_p (a number or a ``[n]`` tensor, >= 0) as a float tensor ``[n]`` (the sign is checked
    on CPU tensors: a device-side check would force a synchronisation)."""
    p = _per_sample(path, n, "the path noise level")
    if p.device.type == "cpu" and p.numel() and bool((p < 0).any()):
        raise FewstepError(f"the path noise level σ_p must be >= 0 (0 = the data end of the path), got values down "
                           f"to {float(p.min()):g}")
    return p


def resolve_guidance(guidance, n: int) -> torch.Tensor:
    """A guidance scale κ (a number or a ``[n]`` tensor) as a float tensor ``[n]``."""
    return _per_sample(guidance, n, "the guidance scale")


def resolve_labels(labels: torch.Tensor | None, num_classes: int, n: int, device) -> torch.Tensor:
    """Labels as a LongTensor ``[n]`` in ``0..num_classes`` (``None`` → the null label ``num_classes``).

    Accepts integer labels or one-hot/probability rows ``[n, num_classes]`` (argmax). Range is
    checked on CPU tensors (a device-side check would force a synchronisation).
    """
    if labels is None:
        return torch.full((n,), num_classes, dtype=torch.long, device=device)
    labels = torch.as_tensor(labels, device=device)
    if labels.ndim == 2 and labels.shape[1] == num_classes and labels.is_floating_point():
        # an all-zero row is EDM's "no label": the null class, not class 0
        labels = torch.where(labels.abs().sum(1) > 0, labels.argmax(1), num_classes)
    if labels.ndim == 0:
        labels = labels.expand(n)
    if labels.shape != (n,):
        raise FewstepError(f"labels must have shape [{n}] (one class index per sample), got {tuple(labels.shape)}")
    labels = labels.long()
    if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() > num_classes):
        raise FewstepError(f"class labels must be in 0..{num_classes} ({num_classes} = no label), got values "
                           f"in [{int(labels.min())}, {int(labels.max())}]")
    return labels
