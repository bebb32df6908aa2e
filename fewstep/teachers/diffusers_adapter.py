"""Use a diffusers UNet + scheduler as a fewstep teacher (a σ-space denoiser).

diffusers models are discrete-time VP models: ``unet(x_t, t).sample`` predicts ε,
v or x_0 for x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε on the scheduler's ``alphas_cumprod``.
:func:`from_diffusers` wraps the pair in a :class:`~fewstep.diffusion.conversions.DiscreteVPDenoiser`
(σ_EDM = √((1−ᾱ)/ᾱ), σ → t by log-σ interpolation, x_t = x_σ/√(1+σ²); DESIGN §1).

:func:`diffusers_model` makes the pair a :class:`~fewstep.model.FewstepModel` (a teacher every
method accepts); :func:`load_diffusers_folder` does the same for a folder written by diffusers'
``save_pretrained`` (a pipeline folder with ``unet/`` and ``scheduler/``, or a UNet folder with
its ``scheduler_config.json`` beside it), which is what ``--teacher PATH`` reads. A student
distilled from such a teacher is the same diffusers UNet with new weights; its checkpoint is a
fewstep model folder (``model.safetensors`` + ``config.json`` holding the UNet's config and the
ᾱ table), so ``fewstep sample`` / ``eval`` and :func:`fewstep.model.load_model` read it back.

Nothing here downloads anything: pass objects you have already built or loaded, or a local
folder. Note that diffusers' ``clip_sample`` / thresholding of x̂_0 are scheduler-side options
and are not applied — the denoiser returns the network's raw x̂_0 estimate.
"""
from __future__ import annotations

import json
from pathlib import Path
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


# ---- checkpoints: a diffusers-UNet denoiser inside fewstep's model format -------------------------
NET_NAME = "diffusers"          # "net": {"name": "diffusers", "class": "UNet2DModel", "config": {...}}
PRECOND_NAME = "vp-discrete"    # "precond": {"name": "vp-discrete", "alphas_cumprod": [...], ...}
UNET_CLASSES = ("UNet2DModel",)  # unconditional or class-conditional image UNets (no text encoder)
WEIGHTS = "diffusion_pytorch_model.safetensors"
DATA_NAME = "diffusers"         # the data name of a diffusers teacher: no dataset or feature net goes by it


def is_diffusers_denoiser(den: nn.Module) -> bool:
    """``den`` is :func:`from_diffusers`' wrapper around a diffusers UNet that can be saved."""
    return (isinstance(den, DiscreteVPDenoiser) and isinstance(den.model, DiffusersUNetModel)
            and type(den.model.unet).__name__ in UNET_CLASSES and hasattr(den.model.unet, "config"))


def _jsonable(v):
    if isinstance(v, Mapping):  # diffusers' private keys (_name_or_path: where it was loaded from) dropped
        return {str(k): _jsonable(x) for k, x in v.items() if k in ("_class_name", "_diffusers_version")
                or not str(k).startswith("_")}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def diffusers_spec(den: DiscreteVPDenoiser) -> dict:
    """The ``net`` and ``precond`` entries of a model config that rebuild ``den`` (weights aside)."""
    if not is_diffusers_denoiser(den):
        raise FewstepError(f"not a saveable diffusers denoiser (supported UNets: {', '.join(UNET_CLASSES)})")
    unet = den.model.unet
    return {"net": {"name": NET_NAME, "class": type(unet).__name__, "config": _jsonable(dict(unet.config))},
            "precond": {"name": PRECOND_NAME, "alphas_cumprod": den.alphas_cumprod.tolist(),
                        "prediction": den.prediction, "quantize": den.quantize,
                        "has_null_class": den.model.has_null_class,
                        "learned_variance": den.model.learned_variance}}


def build_diffusers_denoiser(net: Mapping, precond: Mapping) -> DiscreteVPDenoiser:
    """The (randomly initialised) denoiser a :func:`diffusers_spec` describes."""
    import diffusers

    cls_name = net.get("class", "UNet2DModel")
    if cls_name not in UNET_CLASSES:
        raise FewstepError(f"model config names diffusers class {cls_name!r}; fewstep reads {', '.join(UNET_CLASSES)}")
    unet = getattr(diffusers, cls_name).from_config(dict(net["config"]))
    model = DiffusersUNetModel(unet, has_null_class=bool(precond.get("has_null_class", False)),
                               learned_variance=bool(precond.get("learned_variance", False)))
    table = torch.tensor(precond["alphas_cumprod"], dtype=torch.float64)
    return DiscreteVPDenoiser(model, table, prediction=precond.get("prediction", "epsilon"),
                              quantize=bool(precond.get("quantize", False)))


def diffusers_model(unet: nn.Module, scheduler_or_config, *, name: str = DATA_NAME,
                    prediction_type: str | None = None, has_null_class: bool = False,
                    quantize: bool = False, provenance: dict | None = None):
    """A diffusers ``UNet2DModel`` and its scheduler as a :class:`~fewstep.model.FewstepModel`.

    That is a teacher like any other: ``SiD.create(cfg, teacher=diffusers_model(unet, sched))``,
    ``model.sample(...)``, ``model.save(dir)``. Its default recipe is Heun on the Karras grid
    between the ᾱ table's own σ_min and σ_max. ``name`` is the data name in its config (no
    feature net or dataset goes by it: evaluations and data-reading methods take ``--data``).
    """
    from ..model import FORMAT, FewstepModel

    den = from_diffusers(unet, scheduler_or_config, prediction_type=prediction_type,
                         has_null_class=has_null_class, quantize=quantize)
    if not is_diffusers_denoiser(den):  # what a checkpoint can hold (diffusers_spec)
        raise FewstepError(f"fewstep distils diffusers {', '.join(UNET_CLASSES)} teachers, got "
                           f"{type(unet).__name__} (text-conditional UNets need an encoder fewstep does not run)")
    cfg = unet.config
    size = cfg.get("sample_size")
    if size is None:
        raise FewstepError("the UNet's config has no sample_size: set unet.config.sample_size to the image size it was trained at")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    config = {"format": FORMAT, "version": 1, "type": "denoiser", **diffusers_spec(den),
              "data": {"kind": "images", "sample_shape": [int(cfg["in_channels"]), int(h), int(w)],
                       "num_classes": den.num_classes, "name": name},
              "sampling": {"sampler": "heun", "steps": 18, "schedule": "karras",
                           "sigma_min": den.sigma_min, "sigma_max": den.sigma_max},
              "provenance": provenance or {"source": "diffusers"}}
    return FewstepModel(den, config)


EXPORT_FILE = "fewstep.json"  # beside an exported pipeline: the checkpoint's recipe, data and provenance


def save_diffusers(model, path: str | Path) -> Path:
    """Write ``model`` (a teacher or a student around a diffusers UNet) as a diffusers pipeline folder.

    ``DDPMPipeline(unet, scheduler).save_pretrained(path)``: the UNet's weights (safetensors) and
    a ``DDPMScheduler`` on the model's own ᾱ table (as ``trained_betas``), plus ``fewstep.json``
    with the sampling recipe, so that :func:`load_diffusers_folder` (and ``--teacher``,
    ``fewstep sample``/``eval``) read it back as the same model, one-step students included. In
    plain diffusers, a one-step student samples with one UNet call ``out = unet(x_t, t).sample`` on
    ``x_t = α·σ·z``, α = 1/√(1+σ²) (``one_step.input_scale``), σ = ``one_step.sigma_init``,
    t = ``one_step.timestep`` (all in ``fewstep.json``), then ``x̂_0 = σ·(z − out)`` for ε-prediction
    or ``x̂_0 = α·(x_t − σ·out)`` for v-prediction (``one_step.recipe`` spells it out).
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    den = model.denoiser
    from ..diffusion.consistency import ConsistencyDenoiser

    if isinstance(den, ConsistencyDenoiser):
        raise FewstepError("a consistency model (fewstep distill cd) does not export to a DDPMPipeline: it is its "
                           "network under consistency scalings (f(x, σ_min) = x), which no DDPM scheduler applies; "
                           "it stays a fewstep checkpoint (fewstep sample / eval / load_model read it)")
    if not is_diffusers_denoiser(den):
        raise FewstepError("only models around a diffusers UNet2DModel (a diffusers teacher, or a student "
                           "distilled from one) export to diffusers format; fewstep checkpoints are "
                           "model.safetensors + config.json already")
    a = den.alphas_cumprod
    betas = 1 - a / torch.cat([a.new_ones(1), a[:-1]])  # ᾱ_t = Π (1 − β_s)
    sched = DDPMScheduler(num_train_timesteps=int(a.numel()), trained_betas=betas.tolist(),
                          prediction_type=den.prediction, clip_sample=False,
                          # the UNet's extra variance channels are read (and dropped) only with this set
                          variance_type="learned_range" if den.model.learned_variance else "fixed_small")
    path = Path(path)
    DDPMPipeline(unet=den.model.unet, scheduler=sched).save_pretrained(path)
    info = {"format": "fewstep.diffusers-export", "type": model.config.get("type"), "sampling": model.sampling,
            "data": model.config["data"], "provenance": model.config.get("provenance", {}),
            # how fewstep calls the UNet, which no diffusers config holds
            "adapter": {"quantize": bool(den.quantize), "has_null_class": bool(den.model.has_null_class)}}
    if model.is_generator:
        sigma = float(model.sampling.get("sigma_init", 2.5))
        x0 = {"epsilon": "sigma_init * (z - out)", "v_prediction": "input_scale * (x_t - sigma_init * out)",
              "sample": "out"}[den.prediction]
        info["one_step"] = {"sigma_init": sigma, "timestep": float(den.sigma_to_t(torch.tensor([sigma]))[0]),
                            "input_scale": 1.0 / (1.0 + sigma * sigma) ** 0.5, "prediction": den.prediction,
                            "recipe": f"z ~ N(0, I); x_t = input_scale * sigma_init * z; "
                                      f"out = unet(x_t, timestep).sample; x0 = {x0}"}
    (path / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return path


def diffusers_folder(path: str | Path) -> tuple[Path, Path | None] | None:
    """``(unet folder, scheduler config file or None)`` if ``path`` is a diffusers save, else None.

    A pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``), or a UNet folder
    (``config.json`` naming a diffusers UNet class) with ``scheduler_config.json`` beside it.
    """
    p = Path(path)
    if (p / "unet" / "config.json").is_file():
        sched = p / "scheduler" / "scheduler_config.json"
        return p / "unet", sched if sched.is_file() else None
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            cls_name = json.loads(cfg.read_text()).get("_class_name", "")
        except (ValueError, AttributeError):
            return None
        if isinstance(cls_name, str) and cls_name.startswith("UNet"):
            sched = p / "scheduler_config.json"
            return p, sched if sched.is_file() else None
    return None


def load_diffusers_folder(path: str | Path):
    """Load a diffusers save (see :func:`diffusers_folder`) as a fewstep teacher, offline.

    Weights are read from ``diffusion_pytorch_model.safetensors`` only (a ``.bin`` file is a
    pickle, which fewstep does not load: re-save with ``unet.save_pretrained(dir)``, whose
    default is safetensors) and cast to float32.
    """
    found = diffusers_folder(path)
    if found is None:
        raise FewstepError(f"{path} is not a diffusers folder (expected unet/ + scheduler/, or a UNet's "
                           "config.json with scheduler_config.json beside it)")
    unet_dir, sched = found
    if sched is None:
        raise FewstepError(f"{path} has a diffusers UNet but no scheduler config: fewstep needs the noise "
                           "schedule it was trained with; save it beside the UNet with "
                           "scheduler.save_pretrained(...) (a scheduler/ folder, or scheduler_config.json)")
    cls_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name")
    if cls_name not in UNET_CLASSES:
        raise FewstepError(f"{unet_dir} holds a diffusers {cls_name}; fewstep distils {', '.join(UNET_CLASSES)} teachers")
    if not (unet_dir / WEIGHTS).is_file():
        found_bin = (unet_dir / "diffusion_pytorch_model.bin").is_file()
        raise FewstepError(f"{unet_dir} has no {WEIGHTS}" + (
            " (only a .bin pickle, which fewstep does not load: load it yourself and re-save with "
            "unet.save_pretrained(dir), which writes safetensors)" if found_bin else ""))
    import diffusers

    unet = getattr(diffusers, cls_name).from_pretrained(unet_dir, use_safetensors=True, local_files_only=True,
                                                     low_cpu_mem_usage=False)
    exported = Path(path) / EXPORT_FILE
    info = json.loads(exported.read_text()) if exported.is_file() else {}
    adapter = info.get("adapter", {})
    model = diffusers_model(unet.float().eval(), json.loads(sched.read_text()),
                            provenance={"source": "diffusers", "path": str(Path(path))},
                            quantize=bool(adapter.get("quantize", False)),
                            has_null_class=bool(adapter.get("has_null_class", False)))
    if info:  # written by save_diffusers: the recipe (a one-step student's), data and provenance
        model.config.update({k: info[k] for k in ("type", "sampling", "data") if info.get(k)})
        model.config["provenance"] = {**info.get("provenance", {}), "path": str(Path(path))}
        from ..methods.base import DataInfo

        model.data_info = DataInfo.from_dict(model.config["data"])
    return model


__all__ = ["from_diffusers", "scheduler_alphas_cumprod", "DiffusersUNetModel", "diffusers_model",
           "diffusers_folder", "load_diffusers_folder", "save_diffusers", "is_diffusers_denoiser", "diffusers_spec",
           "DATA_NAME",
           "build_diffusers_denoiser"]
