"""A small DDPM++/EDM-style UNet for images.

``F(x_in [N, C, H, W], c_noise [N], labels) → [N, C, H, W]``. Layout follows
EDM's ``SongUNet``: an input conv, then per resolution level a downsampling
residual block (levels > 0) and ``num_blocks`` residual blocks, every output
kept as a skip; a middle pair of blocks (the first with self-attention when
``mid_attn``); a mirrored decoder whose levels start with an upsampling block
and run ``num_blocks + 1`` blocks that each consume one skip; GroupNorm → SiLU →
a zero-initialised output conv, so a fresh ``EDMPrecond(UNet(...))`` starts as
``c_skip·x``.

Residual blocks are GroupNorm + SiLU + 3x3 convs with the embedding applied as
scale/shift of the second norm (``adaptive_scale``) or added before it, dropout
before the second conv, and outputs scaled by 1/√2.

``pixel_unshuffle = u`` folds ``u x u`` pixel patches into channels at the
input (1x28x28 → 4x14x14 for u = 2) and unfolds them at the output: four times
fewer positions for the convs, the usual trade on CPU. Odd feature sizes are
handled exactly: downsampling averages 2x2 windows with ceil rounding (7 → 4)
and upsampling doubles then crops to the matching skip (4 → 8 → 7).
``attn_resolutions`` name feature-map sizes *inside* the net (after unshuffle).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..config import require
from ..errors import FewstepError
from .embedding import EMBEDDINGS, ConditionEmbedding
from .layers import group_norm

SKIP_SCALE = 1 / math.sqrt(2)


@dataclass
class UNetConfig:
    """Config of :class:`UNet` (round-trips through ``fewstep.config.to_dict/from_dict``)."""

    img_resolution: int = 28         # input height/width (non-square inputs are accepted too)
    in_channels: int = 1
    out_channels: int = 0            # 0 = same as in_channels
    model_channels: int = 64         # width of level 0
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # width multiplier per level
    num_blocks: int = 2              # residual blocks per level (decoder: num_blocks + 1)
    attn_resolutions: list[int] = field(default_factory=list)  # internal feature sizes with attention
    mid_attn: bool = True            # self-attention in the middle block
    channels_per_head: int = 64
    dropout: float = 0.0
    num_classes: int = 0             # 0 = unconditional; K adds K+1 label vectors (K = no label)
    pixel_unshuffle: int = 1         # fold u x u pixel patches into channels (1 = off)
    embedding: str = "positional"    # "positional" (EDM DDPM++) | "fourier"
    fourier_scale: float = 16.0
    emb_mult: int = 4                # embedding width = emb_mult · model_channels
    adaptive_scale: bool = True      # embedding as scale/shift (True) or additive bias (False)
    guidance_embedding: bool = False  # also takes the guidance scale κ (a guidance-distilled net)
    path_embedding: bool = False     # also takes the noise level σ_p of a point of its sampling path (BOOT)
    name: str = "unet"

    @property
    def resolutions(self) -> list[int]:
        """Feature-map side at each level (after unshuffle; ceil-halved per level)."""
        r = self.img_resolution // max(self.pixel_unshuffle, 1)
        out = []
        for _ in self.channel_mult:
            out.append(r)
            r = (r + 1) // 2
        return out

    def validate(self) -> None:
        p = "UNetConfig"
        require(self.name == "unet", f"{p}.name must be 'unet', got {self.name!r}")
        for k in ("img_resolution", "in_channels", "model_channels", "num_blocks", "channels_per_head",
                  "pixel_unshuffle", "emb_mult"):
            require(getattr(self, k) >= 1, f"{p}.{k} must be >= 1, got {getattr(self, k)}")
        require(self.out_channels >= 0, f"{p}.out_channels must be >= 0 (0 = in_channels), got {self.out_channels}")
        require(self.model_channels % 2 == 0, f"{p}.model_channels must be even, got {self.model_channels}")
        require(len(self.channel_mult) >= 1 and all(m >= 1 for m in self.channel_mult),
                f"{p}.channel_mult must be a non-empty list of positive integers, got {self.channel_mult}")
        require(self.img_resolution % self.pixel_unshuffle == 0,
                f"{p}.pixel_unshuffle={self.pixel_unshuffle} must divide img_resolution={self.img_resolution}")
        res = self.resolutions
        require(res[-1] >= 2 or len(res) == 1,
                f"{p}: {len(self.channel_mult)} levels shrink a {res[0]}x{res[0]} feature map below 2x2 "
                f"(levels {res}); use a shorter channel_mult")
        bad = [r for r in self.attn_resolutions if r not in res]
        require(not bad, f"{p}.attn_resolutions {bad} match no level; the levels of this net are {res}")
        require(0.0 <= self.dropout < 1.0, f"{p}.dropout must be in [0, 1), got {self.dropout}")
        require(self.num_classes >= 0, f"{p}.num_classes must be >= 0, got {self.num_classes}")
        require(self.embedding in EMBEDDINGS, f"{p}.embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        require(self.fourier_scale > 0, f"{p}.fourier_scale must be > 0, got {self.fourier_scale}")


def downsample(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling; odd sizes round up (the last row/column averages what exists)."""
    return F.avg_pool2d(x, 2, ceil_mode=True)


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Nearest 2x upsampling cropped to ``size`` (the inverse of :func:`downsample`'s rounding)."""
    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x[..., : size[0], : size[1]]


class SelfAttention(nn.Module):
    """Multi-head self-attention over positions, residual, output projection zero-initialised."""

    def __init__(self, ch: int, channels_per_head: int):
        super().__init__()
        heads = max(1, ch // channels_per_head)
        while ch % heads:  # the largest head count up to ch // channels_per_head that divides ch
            heads -= 1
        self.heads = heads
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        a = a.transpose(-1, -2).reshape(n, c, h, w)
        return (x + self.proj(a)) * SKIP_SCALE


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with noise/class embedding, optional resampling and attention."""

    def __init__(self, cin: int, cout: int, emb_ch: int, *, resample: str | None = None, attn: bool = False,
                 dropout: float = 0.0, adaptive_scale: bool = True, channels_per_head: int = 64):
        super().__init__()
        self.resample = resample
        self.adaptive_scale = adaptive_scale
        self.norm0 = group_norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_ch, cout * (2 if adaptive_scale else 1))
        self.norm1 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)  # each block starts as (resampled) identity / 1x1 projection
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.attn = SelfAttention(cout, channels_per_head) if attn else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, size=None) -> torch.Tensor:
        h = F.silu(self.norm0(x))
        if self.resample == "down":
            h, x = downsample(h), downsample(x)
        elif self.resample == "up":
            size = size if size is not None else (2 * x.shape[-2], 2 * x.shape[-1])
            h, x = upsample(h, size), upsample(x, size)
        h = self.conv0(h)
        p = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = p.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + p))
        h = self.conv1(self.dropout(h))
        x = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        return x if self.attn is None else self.attn(x)


class UNet(nn.Module):
    """DDPM++/EDM-style UNet backbone ``forward(x_in, c_noise, labels=None)`` (see module docstring)."""

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a UNetConfig or keyword options, not both")
        config.validate()
        self.config = c = config
        self.num_classes = c.num_classes
        self.guidance_embedding = c.guidance_embedding
        self.path_embedding = c.path_embedding
        u = c.pixel_unshuffle
        cin_img = c.in_channels * u * u
        cout_img = (c.out_channels or c.in_channels) * u * u
        emb_ch = c.model_channels * c.emb_mult
        block = dict(dropout=c.dropout, adaptive_scale=c.adaptive_scale, channels_per_head=c.channels_per_head)
        self.embed = ConditionEmbedding(c.model_channels, emb_ch, embedding=c.embedding,
                                        fourier_scale=c.fourier_scale, num_classes=c.num_classes,
                                        guidance=c.guidance_embedding, path=c.path_embedding)
        res = c.resolutions
        self.conv_in = nn.Conv2d(cin_img, c.model_channels, 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [c.model_channels]
        ch = c.model_channels
        for level, mult in enumerate(c.channel_mult):
            if level > 0:
                self.enc.append(ResBlock(ch, ch, emb_ch, resample="down", **block))
                skips.append(ch)
            for _ in range(c.num_blocks):
                self.enc.append(ResBlock(ch, c.model_channels * mult, emb_ch,
                                         attn=res[level] in c.attn_resolutions, **block))
                ch = c.model_channels * mult
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_ch, attn=c.mid_attn, **block),
                                  ResBlock(ch, ch, emb_ch, **block)])
        self.dec = nn.ModuleList()
        for level in reversed(range(len(c.channel_mult))):
            if level < len(c.channel_mult) - 1:
                self.dec.append(ResBlock(ch, ch, emb_ch, resample="up", **block))
            for _ in range(c.num_blocks + 1):
                cout = c.model_channels * c.channel_mult[level]
                self.dec.append(ResBlock(ch + skips.pop(), cout, emb_ch,
                                         attn=res[level] in c.attn_resolutions, **block))
                ch = cout
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cout_img, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _encode(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels, guidance=None, path=None):
        c = self.config
        u = c.pixel_unshuffle
        if x_in.ndim != 4 or x_in.shape[1] != c.in_channels:
            raise FewstepError(f"UNet expects images [N, {c.in_channels}, H, W], got shape {tuple(x_in.shape)}")
        if x_in.shape[2] % u or x_in.shape[3] % u:
            raise FewstepError(f"UNet with pixel_unshuffle={u} needs H and W divisible by {u}, "
                               f"got {tuple(x_in.shape[2:])}")
        n = x_in.shape[0]
        emb = self.embed(c_noise.reshape(n), labels, guidance, path)
        x = x_in.to(self.conv_in.weight.dtype)
        if u > 1:
            x = F.pixel_unshuffle(x, u)
        h = self.conv_in(x)
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb)
            skips.append(h)
        return h, skips, emb

    def encoder_features(self, x_in: torch.Tensor, c_noise: torch.Tensor,
                         labels: torch.Tensor | None = None) -> torch.Tensor:
        """The down path's output ``[N, C, h, w]`` (lowest resolution, before the middle blocks)."""
        return self._encode(x_in, c_noise, labels)[0]

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                guidance=None, *, return_features: bool = False, path=None):
        """``F(x_in, c_noise)``; with ``return_features`` also the down path's output (see
        :meth:`encoder_features`) from the same pass; ``guidance``: κ of a guidance-conditioned net;
        ``path``: σ_p of a path-conditioned net (BOOT)."""
        u = self.config.pixel_unshuffle
        h, skips, emb = self._encode(x_in, c_noise, labels, guidance, path)
        feats = h
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.dec:
            if blk.resample == "up":
                h = blk(h, emb, size=skips[-1].shape[-2:])
            else:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        out = F.pixel_shuffle(out, u) if u > 1 else out
        return (out, feats) if return_features else out
