"""Use a diffusers UNet + scheduler as a fewstep teacher (a σ-space denoiser).

diffusers models are discrete-time VP models: ``unet(x_t, t).sample`` predicts ε,
v or x_0 for x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε on the scheduler's ``alphas_cumprod``.
:func:`from_diffusers` wraps the pair in a :class:`~fewstep.diffusion.conversions.DiscreteVPDenoiser`
(σ_EDM = √((1−ᾱ)/ᾱ), σ → t by log-σ interpolation, x_t = x_σ/√(1+σ²); DESIGN §1).

Nothing here downloads anything: pass objects you have already built or loaded.
Note that diffusers' ``clip_sample`` / thresholding of x̂_0 are scheduler-side options
and are not applied — the denoiser returns the network's raw x̂_0 estimate.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..diffusion.conversions import PREDICTIONS, DiscreteVPDenoiser
from ..errors import FewstepError


def _config_of(obj: Any) -> dict:
    cfg = getattr(obj, "config", obj)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise FewstepError(
        f"expected a diffusers scheduler or its config dict, got {type(obj).__name__}")


def scheduler_alphas_cumprod(scheduler_or_config) -> torch.Tensor:
    """The ``alphas_cumprod`` table of a diffusers scheduler object or config dict.

    A config dict is rebuilt with diffusers' own ``DDPMScheduler`` (so every
    ``beta_schedule`` diffusers knows, ``trained_betas`` and ``rescale_betas_zero_snr``
    give exactly diffusers' numbers); it must describe a β schedule.
    """
    table = getattr(scheduler_or_config, "alphas_cumprod", None)
    if table is not None:
        return torch.as_tensor(table).detach().cpu().to(torch.float64)
    if hasattr(scheduler_or_config, "config") or not isinstance(scheduler_or_config, Mapping):
        raise FewstepError(
            f"scheduler {type(scheduler_or_config).__name__} has no alphas_cumprod table; fewstep "
            "adapts discrete VP (DDPM-type) schedulers only, e.g. DDPMScheduler, DDIMScheduler, "
            "EulerDiscreteScheduler (flow-matching schedulers are not supported)")
    cfg = dict(scheduler_or_config)
    if "beta_schedule" not in cfg and cfg.get("trained_betas") is None:
        raise FewstepError(
            f"scheduler config ({cfg.get('_class_name', 'no _class_name')}) has neither "
            "'beta_schedule' nor 'trained_betas', so it has no alphas_cumprod table; fewstep adapts "
            "discrete VP (DDPM-type) schedulers only")
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        sched = DDPMScheduler.from_config(cfg)
    except NotImplementedError as e:
        raise FewstepError(f"diffusers cannot build this beta schedule: {e}") from None
    return sched.alphas_cumprod.to(torch.float64)


class DiffusersUNetModel(nn.Module):
    """Calls a diffusers UNet as ``model(x_t, t, labels) -> raw prediction`` (a tensor).

    Labels go to ``class_labels`` when the UNet has class embeddings
    (``num_class_embeds``). ``num_classes`` is ``num_class_embeds``, or one less if
    ``has_null_class`` says the last embedding is the "no label" class (fewstep's convention:
    label ``num_classes`` = no label).
    """

    def __init__(self, unet: nn.Module, has_null_class: bool = False, learned_variance: bool = False):
        super().__init__()
        self.unet = unet
        cfg = dict(getattr(unet, "config", {}) or {})
        self.num_class_embeds = int(cfg.get("num_class_embeds") or 0)
        if has_null_class and self.num_class_embeds < 2:
            raise FewstepError("has_null_class=True needs a UNet with num_class_embeds >= 2")
        self.has_null_class = bool(has_null_class)
        self.learned_variance = bool(learned_variance)

    @property
    def num_classes(self) -> int:
        return self.num_class_embeds - int(self.has_null_class)

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        p = next(self.unet.parameters(), None)
        return p.dtype if p is not None else x.dtype

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {}
        if self.num_class_embeds:
            if labels is None:
                raise FewstepError(
                    f"this diffusers UNet is class-conditional ({self.num_class_embeds} class embeddings); "
                    "pass labels=LongTensor[N]")
            labels = torch.as_tensor(labels, device=x_t.device).long()
            if ((labels < 0) | (labels >= self.num_class_embeds)).any():
                hint = "" if self.has_null_class else (
                    "; it has no 'no label' class unless its last embedding is one "
                    "(then pass has_null_class=True to from_diffusers)")
                raise FewstepError(f"labels must be in 0..{self.num_class_embeds - 1}{hint}")
            kwargs["class_labels"] = labels
        elif labels is not None:
            raise FewstepError("this diffusers UNet is unconditional (no num_class_embeds); pass labels=None")
        dtype = self._dtype(x_t)
        # t stays float32 (fractional timesteps would lose precision in half precision)
        out = self.unet(x_t.to(dtype), t.float(), **kwargs)
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out
        if self.learned_variance and out.shape[1] == 2 * x_t.shape[1]:
            out = out[:, : x_t.shape[1]]  # drop the learned-variance channels
        return out.to(x_t.dtype)


def from_diffusers(unet: nn.Module, scheduler_or_config, *, prediction_type: str | None = None,
                   has_null_class: bool = False, quantize: bool = False) -> DiscreteVPDenoiser:
    """Wrap a diffusers ``UNet2DModel`` (or any module returning ``.sample``) as a σ-space denoiser.

    Args:
        unet: called as ``unet(x_t, t, class_labels=...)`` with fractional ``t`` of shape ``[N]``.
        scheduler_or_config: a diffusers scheduler with ``alphas_cumprod`` (DDPM, DDIM, Euler, …)
            or its config dict (``scheduler.config`` / ``scheduler_config.json`` contents).
        prediction_type: override the scheduler's ``prediction_type``
            (``epsilon``, ``v_prediction`` or ``sample``).
        has_null_class: the UNet's last class embedding means "no label".
        quantize: call the UNet at the nearest integer timestep instead of a fractional one.

    Returns:
        a :class:`DiscreteVPDenoiser` with ``.sigma_min``, ``.sigma_max``, ``.sigmas``,
        ``.alphas_cumprod`` and ``.num_classes``.
    """
    cfg = _config_of(scheduler_or_config)
    pred = prediction_type or cfg.get("prediction_type") or "epsilon"
    if pred not in PREDICTIONS:
        raise FewstepError(
            f"unsupported prediction_type {pred!r}; from_diffusers handles {list(PREDICTIONS)}")
    table = scheduler_alphas_cumprod(scheduler_or_config)
    learned = str(cfg.get("variance_type", "")) in ("learned", "learned_range")
    model = DiffusersUNetModel(unet, has_null_class=has_null_class, learned_variance=learned)
    return DiscreteVPDenoiser(model, table, prediction=pred, quantize=quantize)


__all__ = ["from_diffusers", "scheduler_alphas_cumprod", "DiffusersUNetModel"]
