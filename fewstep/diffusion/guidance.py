"""Classifier-free guidance for σ-space denoisers.

With a conditional denoiser that also knows a "no label" class (label ``K`` for a
net with ``num_classes = K``, see docs/architecture.md), the guided denoiser is

    D_κ(x, σ, c) = D(x, σ, ∅) + κ · (D(x, σ, c) − D(x, σ, ∅)),

so κ = 1 is the plain conditional denoiser and κ = 0 the unconditional one
(κ here is the "1 + w" of Ho & Salimans / Meng et al.; SiD-LSG's κ is this scale).

A *guidance-conditioned* denoiser (made by guidance distillation,
:mod:`fewstep.methods.guidance`) takes κ as an input instead and predicts D_κ in
one pass: :class:`GuidanceInput` binds κ to it, and :func:`with_guidance` picks
whichever of the two a denoiser needs.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import FewstepError
from .denoiser import append_dims, as_sigma


def cfg_combine(d_cond: torch.Tensor, d_uncond: torch.Tensor, scale) -> torch.Tensor:
    """D_u + scale·(D_c − D_u); ``scale`` is a float or a per-sample ``[N]`` tensor."""
    scale = torch.as_tensor(scale, device=d_cond.device, dtype=d_cond.dtype)
    if scale.ndim == 1:
        scale = append_dims(scale, d_cond.ndim)
    return d_uncond + scale * (d_cond - d_uncond)


class CFGDenoiser(nn.Module):
    """Wrap a conditional denoiser with classifier-free guidance of strength ``scale``.

    Conditional and unconditional branches run in one forward pass of batch 2N
    (scale 1 or 0 skips the branch it does not need).

    Args:
        denoiser: a σ-space denoiser accepting ``labels`` (LongTensor ``[N]``).
        scale: guidance scale κ (float, or ``[N]`` tensor for per-sample scales).
        null_label: the "no label" class; defaults to ``denoiser.num_classes``.
    """

    def __init__(self, denoiser: nn.Module, scale: float = 1.0, null_label: int | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.scale = scale
        num_classes = int(getattr(denoiser, "num_classes", 0) or 0)
        if null_label is None:
            if num_classes <= 0:
                raise FewstepError(
                    "CFGDenoiser needs a conditional denoiser (num_classes > 0) or an explicit "
                    "null_label=<the class index meaning 'no label'>")
            null_label = num_classes
        self.null_label = int(null_label)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.denoiser, "num_classes", 0) or 0)

    @property
    def alphas_cumprod(self) -> torch.Tensor | None:
        """The wrapped denoiser's discrete ᾱ table, if it has one (the ``vp-uniform`` grid reads it)."""
        return getattr(self.denoiser, "alphas_cumprod", None)

    @property
    def evaluations_per_call(self) -> int:
        """Network evaluations per sample in one call: 2 (conditional and unconditional), 1 at κ = 0 or 1."""
        return 1 if not torch.is_tensor(self.scale) and float(self.scale) in (0.0, 1.0) else 2

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise FewstepError(
                "classifier-free guidance needs class labels: pass labels=LongTensor[N] "
                f"(use {self.null_label} for 'no label')")
        sigma = as_sigma(sigma, x)
        labels = torch.as_tensor(labels, device=x.device, dtype=torch.long).expand(x.shape[0])
        scale = self.scale
        if not torch.is_tensor(scale) and float(scale) == 1.0:
            return self.denoiser(x, sigma, labels)
        null = torch.full_like(labels, self.null_label)
        if not torch.is_tensor(scale) and float(scale) == 0.0:
            return self.denoiser(x, sigma, null)
        d = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
        d_cond, d_uncond = d.chunk(2)
        return cfg_combine(d_cond, d_uncond, scale)


def is_guidance_conditioned(denoiser: nn.Module) -> bool:
    """Whether ``denoiser`` takes the guidance scale κ as an input (a guidance-distilled network)."""
    return bool(getattr(denoiser, "guidance_embedding", False))


class GuidanceInput(nn.Module):
    """A guidance-conditioned denoiser at guidance scale ``scale`` (a float or ``[N]`` tensor): one network
    evaluation per call, where :class:`CFGDenoiser` needs two. A plain ``(x, σ, labels)`` denoiser, so every
    sampler and method takes it."""

    evaluations_per_call = 1

    def __init__(self, denoiser: nn.Module, scale=1.0):
        super().__init__()
        if not is_guidance_conditioned(denoiser):
            raise FewstepError("GuidanceInput needs a guidance-conditioned denoiser (one made by guidance "
                               "distillation); wrap other conditional denoisers in CFGDenoiser")
        self.denoiser = denoiser
        self.scale = scale

    @property
    def num_classes(self) -> int:
        return int(getattr(self.denoiser, "num_classes", 0) or 0)

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.scale.to(x.device) if torch.is_tensor(self.scale) else self.scale
        return self.denoiser(x, sigma, labels, guidance=scale)


def rows_of(denoiser: nn.Module, index) -> nn.Module:
    """``denoiser`` for the rows ``index`` of the batch it was made for: a guided denoiser with per-sample
    scales ``[N]`` keeps those rows' scales (for a method that evaluates part of a batch); others as they are."""
    scale = getattr(denoiser, "scale", None)
    if not torch.is_tensor(scale) or scale.ndim == 0 or not isinstance(denoiser, (CFGDenoiser, GuidanceInput)):
        return denoiser
    if isinstance(denoiser, GuidanceInput):
        return GuidanceInput(denoiser.denoiser, scale[index])
    return CFGDenoiser(denoiser.denoiser, scale[index], null_label=denoiser.null_label)


def with_guidance(denoiser: nn.Module, scale, null_label: int | None = None) -> nn.Module:
    """``denoiser`` at guidance scale κ = ``scale``: its own guidance input if it has one
    (:class:`GuidanceInput`, one evaluation), else classifier-free guidance (:class:`CFGDenoiser`, two).
    κ = 0, the unconditional model, is the null label's prediction either way."""
    if is_guidance_conditioned(denoiser) and (torch.is_tensor(scale) or float(scale) != 0.0):
        return GuidanceInput(denoiser, scale)
    return CFGDenoiser(denoiser, scale, null_label=null_label)


__all__ = ["cfg_combine", "CFGDenoiser", "GuidanceInput", "is_guidance_conditioned", "rows_of", "with_guidance"]
