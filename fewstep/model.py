"""Model checkpoints users sample from, evaluate and export.

A model checkpoint is a folder with ``model.safetensors`` and ``config.json``::

    {"format": "fewstep.model", "version": 1,
     "type": "denoiser" | "generator" | "mixture",
     "net": {...}, "precond": {"name": "edm", "sigma_data": 0.5},   # denoiser / generator
               # a consistency model (fewstep distill cd): {"name": "consistency", "sigma_min": 0.002,
               #  "sigma_data": 0.5, "inner": <the precond of the denoiser it wraps>}
     "mixture": {...},                                              # exact mixture teacher
     "data": {"kind": "images", "sample_shape": [1, 28, 28], "num_classes": 10, "name": "mnist5k"},
     "sampling": {"sampler": "heun", "steps": 18, "schedule": "karras"}   # how it is meant to be sampled
               | {"sampler": "one-step", "sigma_init": 2.5},
     "provenance": {...}}

``load_model`` accepts such a folder, a run folder (its ``model/``), the
``model.safetensors`` file itself, ``shipped:<name>`` for a reference teacher
shipped with fewstep, ``mixture:<preset>`` for an exact mixture, or a folder
written by diffusers' ``save_pretrained`` (a UNet2DModel with its scheduler; see
:mod:`fewstep.teachers.diffusers_adapter`). A denoiser around a diffusers UNet is
saved with ``"net": {"name": "diffusers", ...}, "precond": {"name": "vp-discrete", ...}``.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from .diffusion.denoiser import EDMPrecond
from .errors import FewstepError
from .methods.base import DataInfo
from .training.checkpoint import (load_state_dict_strict, read_json, read_tensors, recover_checkpoint_dir,
                                  write_checkpoint_dir)

FORMAT = "fewstep.model"
ONE_STEP = "one-step"


def balanced_labels(n: int, num_classes: int, device=None) -> torch.Tensor | None:
    """Labels 0,1,..,K-1,0,1,.. for class-conditional sampling (None if unconditional)."""
    if num_classes <= 0:
        return None
    return torch.arange(n, device=device) % num_classes


def one_step_generate(generator: nn.Module, z: torch.Tensor, sigma_init: float,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
    """x_g = G(σ_init·z, σ_init)  (SiD's one-step generator, DESIGN §3)."""
    sigma = torch.full((z.shape[0],), float(sigma_init), device=z.device, dtype=z.dtype)
    return generator(sigma_init * z, sigma, labels)


class FewstepModel:
    """A denoiser or generator plus the recipe to sample it."""

    def __init__(self, denoiser: nn.Module, config: dict):
        self.denoiser = denoiser.eval()
        self.config = config
        self.data_info = DataInfo.from_dict(config["data"])

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_parts(cls, net: nn.Module, config: dict) -> "FewstepModel":
        """Wrap an existing network (a raw backbone for denoiser/generator types)."""
        if config["type"] in ("denoiser", "generator") and config.get("precond", {}).get("name", "edm") == "edm":
            den = net if isinstance(net, EDMPrecond) else EDMPrecond(net, config["precond"]["sigma_data"])
        else:
            den = net
        return cls(den, config)

    @property
    def sampling(self) -> dict:
        return dict(self.config.get("sampling", {"sampler": "heun", "steps": 18, "schedule": "karras"}))

    @property
    def is_generator(self) -> bool:
        return self.sampling.get("sampler") == ONE_STEP

    def nfe(self, sampler: str | None = None, steps: int | None = None) -> int:
        from .diffusion.samplers import nfe

        s = self.sampling
        sampler = sampler or s["sampler"]
        if sampler == ONE_STEP:
            return 1
        return nfe(sampler, steps or s.get("steps", 18))

    def to(self, device) -> "FewstepModel":
        self.denoiser.to(device)
        return self

    @property
    def device(self) -> torch.device:
        p = next(self.denoiser.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ---- sampling ------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 0, sampler: str | None = None, steps: int | None = None,
               schedule: str | None = None, labels: torch.Tensor | None = None,
               guidance: float | None = None, batch_size: int | None = None, **sampler_kwargs):
        """Draw ``n`` samples in model space; returns ``SampleResult(x, nfe)``.

        Defaults come from the checkpoint's ``sampling`` recipe; ``sampler``/``steps``
        override it (a one-step generator can also be used as a denoiser with any sampler).
        ``nfe`` counts network evaluations per sample: guidance (κ ≠ 0, 1) doubles it, except on a
        guidance-distilled model, which takes κ as an input.
        """
        from .diffusion.guidance import with_guidance
        from .diffusion.samplers import SampleResult, initial_noise, sample

        if n < 1:
            raise FewstepError(f"number of samples must be >= 1, got {n}")
        if steps is not None and int(steps) < 1:
            raise FewstepError(f"steps must be >= 1, got {steps}")
        recipe = self.sampling
        if sampler is None and recipe["sampler"] == ONE_STEP and (steps is not None or schedule is not None):
            raise FewstepError("this is a one-step generator: steps and schedule belong to a multi-step sampler; "
                               "pass a sampler too (e.g. --sampler heun) to use it as a denoiser, or leave them out")
        sampler = sampler or recipe["sampler"]
        device = self.device
        k = self.data_info.num_classes
        if labels is None:
            labels = balanced_labels(n, k, device)
        den = self.denoiser
        if guidance is not None and guidance != 1.0:
            if k <= 0:
                raise FewstepError("guidance needs a class-conditional model; this one is unconditional")
            if self.config.get("precond", {}).get("name") == "consistency":
                raise FewstepError("guidance mixes a model's labelled and unlabelled predictions, but consistency "
                                   "distillation trains only the labelled one (its null class is the teacher's "
                                   "untouched): sample the consistency model without --guidance")
            lo, hi = self.config.get("provenance", {}).get("guidance_range") or (None, None)
            if lo is not None and not lo <= guidance <= hi and guidance != 0:
                warnings.warn(f"guidance {guidance:g} is outside the range [{lo:g}, {hi:g}] this model was "
                              "guidance-distilled on: its predictions there are extrapolated", stacklevel=2)
            den = with_guidance(den, guidance, null_label=k)  # one pass for a guidance-distilled net
        shape = (n,) + tuple(self.data_info.sample_shape)
        per_call = getattr(den, "evaluations_per_call", 1)
        if sampler == ONE_STEP:
            z = initial_noise(shape, seed, device)  # the same z the teacher's samplers start from
            bs = batch_size or n
            out = [one_step_generate(den, z[i:i + bs], recipe.get("sigma_init", 2.5),
                                     None if labels is None else labels[i:i + bs])
                   for i in range(0, n, bs)]
            return SampleResult(torch.cat(out), per_call)
        steps = int(steps if steps is not None else recipe.get("steps", 18))
        schedule = schedule or recipe.get("schedule", "karras")
        kw = {k2: v for k2, v in recipe.items() if k2 not in ("sampler", "steps", "schedule", "sigma_init")}
        kw.update(sampler_kwargs)
        res = sample(den, shape, sampler=sampler, steps=steps, schedule=schedule, labels=labels,
                     seed=seed, batch_size=batch_size, device=device, **kw)
        return res._replace(nfe=res.nfe * per_call) if per_call != 1 else res

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        return save_model(path, self.denoiser, self.config)


def weights_module(denoiser: nn.Module) -> nn.Module:
    """The module whose state dict ``model.safetensors`` holds: an EDM denoiser's backbone, a consistency
    model's inner denoiser's, else the module itself."""
    from .diffusion.consistency import ConsistencyDenoiser

    if isinstance(denoiser, ConsistencyDenoiser):
        return weights_module(denoiser.inner)
    return denoiser.net if isinstance(denoiser, EDMPrecond) else denoiser


def network_spec(denoiser: nn.Module) -> dict:
    """The ``net`` and ``precond`` entries of a model config that rebuild ``denoiser``'s network:
    a fewstep backbone under EDM preconditioning, or a diffusers UNet on its ᾱ table (either of them
    wrapped in a consistency model's boundary-condition scalings)."""
    from .diffusion.consistency import ConsistencyDenoiser

    if isinstance(denoiser, ConsistencyDenoiser):
        inner = network_spec(denoiser.inner)
        return {"net": inner["net"], "precond": {"name": "consistency", "sigma_min": denoiser.sigma_min,
                                                 "sigma_data": denoiser.sigma_data, "inner": inner["precond"]}}
    if isinstance(denoiser, EDMPrecond):
        from .nets.build import net_config

        return {"net": net_config(denoiser.net), "precond": {"name": "edm", "sigma_data": denoiser.sigma_data}}
    from .teachers.diffusers_adapter import diffusers_spec, is_diffusers_denoiser

    if is_diffusers_denoiser(denoiser):
        return diffusers_spec(denoiser)
    raise FewstepError(f"a {type(denoiser).__name__} cannot be saved as a checkpoint: fewstep saves its own "
                       "networks (EDMPrecond) and diffusers UNet2DModel denoisers")


def save_model(path: str | Path, denoiser: nn.Module, config: dict) -> Path:
    """Atomically write ``model.safetensors`` + ``config.json`` to the folder ``path``."""
    cfg = dict(config)
    cfg.setdefault("format", FORMAT)
    cfg.setdefault("version", 1)
    tensors = {k: v for k, v in weights_module(denoiser).state_dict().items()}
    return write_checkpoint_dir(Path(path), {"model.safetensors": tensors, "config.json": cfg})


def resolve_model_dir(path: str | Path) -> Path:
    """Find the model folder behind a run folder, model folder or weights file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    recover_checkpoint_dir(p)
    recover_checkpoint_dir(p / "model")  # a run killed while it replaced RUN/model
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if not p.exists():
        raise FewstepError(f"no checkpoint at {p}: give a run folder, a model folder "
                           "(model.safetensors + config.json), a diffusers folder, or mixture:<preset>")
    if p.suffix in (".pt", ".pth", ".pkl", ".ckpt"):
        raise FewstepError(f"{p} looks like a pickle checkpoint; fewstep loads only safetensors "
                           "model folders (convert with fewstep.model.save_model)")
    raise FewstepError(f"{p} holds no fewstep model (expected model.safetensors + config.json, "
                       f"or a run folder with model/ inside); was the run finished or its first "
                       "snapshot written?")


def build_from_config(config: dict) -> nn.Module:
    """Rebuild the (untrained) network a model config describes."""
    typ = config.get("type")
    if typ == "mixture":
        from .diffusion.mixture import GaussianMixture

        return GaussianMixture.from_dict(config["mixture"]).denoiser()
    if typ in ("denoiser", "generator"):
        from .nets.build import build_net

        precond = config.get("precond", {})
        if precond.get("name") == "consistency":
            from .diffusion.consistency import ConsistencyDenoiser

            if not isinstance(precond.get("inner"), dict):
                raise FewstepError("a consistency model's config needs precond.inner (the preconditioning of the "
                                   "denoiser it wraps)")
            inner = build_from_config({**config, "precond": precond["inner"]})
            return ConsistencyDenoiser(inner, float(precond["sigma_min"]), float(precond.get("sigma_data", 0.5)))
        if precond.get("name", "edm") != "edm":
            from .teachers.diffusers_adapter import PRECOND_NAME, build_diffusers_denoiser

            if precond["name"] != PRECOND_NAME:
                raise FewstepError(f"model config has unknown precond {precond['name']!r} (expected edm, "
                                   f"consistency or {PRECOND_NAME})")
            return build_diffusers_denoiser(config["net"], precond)
        return EDMPrecond(build_net(config["net"]), config.get("precond", {}).get("sigma_data", 0.5))
    raise FewstepError(f"model config has unknown type {typ!r} (expected denoiser, generator or mixture)")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> FewstepModel:
    """Load a model checkpoint (see module docstring for what ``path`` may be)."""
    from .training.distributed import process_device

    device = process_device(device)  # a clear error for a GPU this machine does not have
    spec = str(path)
    if spec.startswith("mixture:"):
        return mixture_model(spec.split(":", 1)[1]).to(device)
    if spec.startswith("shipped:"):
        from .demo import shipped_teacher

        path = shipped_teacher(spec.split(":", 1)[1])
    if not (Path(path) / "model.safetensors").is_file():
        from .teachers.diffusers_adapter import diffusers_folder, load_diffusers_folder

        if diffusers_folder(path) is not None:
            return load_diffusers_folder(path).to(device)
    d = resolve_model_dir(path)
    config = read_json(d / "config.json")
    if config.get("format") != FORMAT:
        raise FewstepError(f"{d / 'config.json'} is not a fewstep model config (format={config.get('format')!r})")
    den = build_from_config(config)
    if config["type"] != "mixture":
        load_state_dict_strict(weights_module(den), read_tensors(d / "model.safetensors"), f"weights in {d}")
    return FewstepModel(den, config).to(device)


def mixture_model(name: str) -> FewstepModel:
    """The exact Gaussian-mixture teacher ``name`` as a model (DESIGN §2)."""
    from .diffusion.mixture import PRESETS, preset

    if name not in PRESETS:
        raise FewstepError(f"unknown mixture preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    mix = preset(name)
    config = {"format": FORMAT, "version": 1, "type": "mixture", "mixture": mix.to_dict(),
              "data": {"kind": "points", "sample_shape": [mix.dim], "num_classes": 0, "name": f"mixture:{name}"},
              "sampling": {"sampler": "heun", "steps": 18, "schedule": "karras"},
              "provenance": {"exact": True}}
    return FewstepModel(mix.denoiser(), config)


def copy_model(model: FewstepModel) -> FewstepModel:
    return FewstepModel(copy.deepcopy(model.denoiser), copy.deepcopy(model.config))
