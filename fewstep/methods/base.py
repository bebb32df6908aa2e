"""The interface every method (teacher training and each distillation) implements.

A method declares its networks, its optimisers and its *update phases*; the one
training loop in :mod:`fewstep.training.loop` runs them. Methods hold no loop
of their own, and their losses are pure functions a user can call directly.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import FewstepError

LossFn = Callable[[Any], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class Phase:
    """One update: ``loss(batch)`` is minimised by optimiser ``optimizer`` ``repeats`` times;
    ``grad_clip_value`` clips each gradient element to ±value before the step (None: off)."""

    name: str
    optimizer: str
    loss: LossFn
    repeats: int = 1
    grad_clip_value: float | None = None


@dataclass
class DataInfo:
    """What the loop and the exporters need to know about the data a model makes."""

    kind: str  # "images" | "points"
    sample_shape: tuple[int, ...]
    num_classes: int = 0
    name: str = ""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sample_shape": list(self.sample_shape),
                "num_classes": self.num_classes, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "DataInfo":
        return cls(kind=d["kind"], sample_shape=tuple(d["sample_shape"]),
                   num_classes=int(d.get("num_classes", 0)), name=d.get("name", ""))


METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: makes a method available to the CLI and the bench by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type["Method"]:
    from . import _load_all  # noqa: F401  (registers every built-in method)

    if name not in METHODS:
        raise FewstepError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def initial_network(method: str, teacher, init=None) -> nn.Module:
    """A copy of the network a student starts from: ``init``'s if given, else the teacher's
    (a fewstep network, or a diffusers UNet on its ᾱ table: the student is then that UNet too).

    Exact-mixture (or other weightless) teachers need ``--init``; its samples must have
    the teacher's shape. Raises :class:`FewstepError` saying which.
    """
    import copy

    from ..diffusion.denoiser import EDMPrecond
    from ..teachers.diffusers_adapter import is_diffusers_denoiser

    src = init or teacher
    if init is not None and not (isinstance(init.denoiser, EDMPrecond) or is_diffusers_denoiser(init.denoiser)):
        raise FewstepError(f"--init must be a model with a network to copy (a fewstep denoiser or a diffusers "
                           f"UNet); this one ({init.config.get('type')}) has none")
    if not (isinstance(src.denoiser, EDMPrecond) or is_diffusers_denoiser(src.denoiser)):
        raise FewstepError(
            f"{method} initialises its networks from the teacher's network, but this teacher "
            f"({src.config.get('type')}) has none: pass --init with a fewstep denoiser of the same data "
            "(e.g. one trained with `fewstep teacher`, such as shipped:8gaussians for mixture:ring8)")
    if init is not None and tuple(init.data_info.sample_shape) != tuple(teacher.data_info.sample_shape):
        raise FewstepError(f"--init makes samples of shape {init.data_info.sample_shape} but the teacher "
                           f"{teacher.data_info.sample_shape}")
    return copy.deepcopy(src.denoiser)


def with_new_input(denoiser: nn.Module, flag: str, what: str, why: str) -> nn.Module:
    """A copy of a fewstep denoiser whose backbone gets the extra input that config ``flag`` switches on
    (``guidance_embedding``, ``path_embedding``; zero-initialised, so the copy computes what ``denoiser``
    computes until trained). A denoiser that already has it is copied as it is. ``what``/``why`` word the
    error for a network that cannot take it: "{what} to a fewstep network (...); this teacher's network is
    not one ({why}"."""
    from ..diffusion.denoiser import EDMPrecond
    from ..nets.build import build_net, net_config

    if not isinstance(denoiser, EDMPrecond):
        raise FewstepError(f"{what} to a fewstep network (a UNet or MLP under EDM preconditioning); this "
                           f"teacher's network is not one ({why}")
    cfg = net_config(denoiser.net)
    if cfg["name"] == "two-head":  # a --prediction both net: the input goes to its backbone
        cfg = {**cfg, "inner": {**cfg["inner"], flag: True}}
    else:
        cfg = {**cfg, flag: True}
    net = build_net(cfg)
    prefix = "embed." + flag.removesuffix("_embedding")
    missing, unexpected = net.load_state_dict(denoiser.net.state_dict(), strict=False)
    if unexpected or any(not k.removeprefix("inner.").startswith(prefix) for k in missing):
        raise FewstepError(f"could not copy the teacher's weights into its copy with the new input "
                           f"(missing {missing}, unexpected {unexpected})")
    return EDMPrecond(net, denoiser.sigma_data).to(next(denoiser.parameters()).device)


def student_data_info(teacher, init=None) -> DataInfo:
    """The data a student makes: the teacher's, with classes only where ``init`` (if given) has them too."""
    info = DataInfo(**{**teacher.data_info.__dict__})
    if init is not None:
        info.num_classes = min(teacher.data_info.num_classes, init.data_info.num_classes)
    return info


def check_guidance_classes(guidance: float, teacher, info: DataInfo) -> None:
    """Refuse a teacher guidance scale κ ≠ 1 when the student draws no labels: say whether the teacher or
    ``--init`` is the unconditional one."""
    if guidance == 1.0 or info.num_classes > 0:
        return
    if teacher.data_info.num_classes == 0:
        raise FewstepError(f"--guidance {guidance:g} needs a class-conditional teacher; this one is unconditional")
    raise FewstepError(f"--guidance {guidance:g} guides the teacher's class-conditional predictions, but --init is "
                       "unconditional, so the student draws no labels: leave --guidance out, or pass an --init with "
                       "the teacher's classes")


def check_sigma_range(teacher_denoiser: nn.Module, *, sigma_min: float | None = None,
                      sigma_max: float | None = None, grid: str = "grid") -> None:
    """Refuse a σ grid that leaves the range of a teacher on a discrete ᾱ table (a diffusers UNet's
    ``sigma_min`` / ``sigma_max``), where it would be evaluated out of range; naming the value to pass.
    The suggestion is printed to 7 significant digits (≤ 5e-7 relative), inside the 1e-6 tolerance,
    so passing it as printed is accepted. Teachers without such a range pass every grid."""
    lo, hi = getattr(teacher_denoiser, "sigma_min", None), getattr(teacher_denoiser, "sigma_max", None)
    if sigma_min is not None and isinstance(lo, (int, float)) and sigma_min < lo * (1 - 1e-6):
        raise FewstepError(f"this teacher's noise table starts at σ = {lo:.7g}, but the {grid} ends at sigma_min = "
                           f"{sigma_min:g}, where the teacher would be evaluated out of its range: pass "
                           f"--sigma-min {lo:.7g} (or higher)")
    if sigma_max is not None and isinstance(hi, (int, float)) and sigma_max > hi * (1 + 1e-6):
        raise FewstepError(f"this teacher's noise table ends at σ = {hi:.7g}, but the {grid} starts at sigma_max = "
                           f"{sigma_max:g}, where the teacher would be evaluated out of its range: pass "
                           f"--sigma-max {hi:.7g} (or lower)")


class Method(abc.ABC):
    """Base class. Subclasses set ``name``, ``Config`` and implement the abstract hooks.

    Attributes set by subclasses in ``__init__``:
      ``nets``: every trainable network by name (saved in training checkpoints);
      ``frozen``: frozen networks (the teacher), rebuilt from the run config on resume;
      ``ema_net``: the name in ``nets`` whose EMA is the exported student (or None);
      ``data_info``: kind and shape of generated samples.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    uses_data: ClassVar[bool] = False  # True: the loop feeds (x, labels) batches from a dataset
    summary: ClassVar[str] = ""  # one line for `--help` and the bench
    bench_steps: ClassVar[tuple[int, ...]] = ()  # step counts `fewstep bench` scores the student at, besides its own
    bench_default: ClassVar[bool] = True  # in `fewstep bench`'s default methods (False: it does not cut the steps)

    def __init__(self, config):
        self.config = config
        self.nets: dict[str, nn.Module] = {}
        self.frozen: dict[str, nn.Module] = {}
        self.ema_net: str | None = None
        self.data_info: DataInfo | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.device = torch.device("cpu")
        self.batch_size = 64  # images per iteration and process; the loop sets it from its config
        self.run_dir = None  # the run folder (a Path); the loop sets it before training
        self.log = lambda message, echo=False: None  # a line for the run's log.txt (echo: also on stderr); the loop sets it

    # ---- set-up -------------------------------------------------------------------------
    def to(self, device: torch.device) -> "Method":
        self.device = torch.device(device)
        for m in list(self.nets.values()) + list(self.frozen.values()):
            m.to(self.device)
        return self

    @abc.abstractmethod
    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Create the optimisers (called by the loop once networks are on their device)."""

    @abc.abstractmethod
    def phases(self) -> list[Phase]:
        """The ordered update phases of one iteration."""

    def draw_labels(self, n: int) -> torch.Tensor | None:
        """``n`` class labels uniform over the student's classes (``None`` for an unconditional student), for
        data-free methods."""
        k = self.data_info.num_classes
        return torch.randint(0, k, (n,), device=self.device) if k > 0 else None

    def images_per_iteration(self, batch_size: int) -> int:
        """Images the method consumes (data) or generates per iteration and process."""
        return batch_size

    def check_training(self, train_config, world_size: int = 1) -> None:
        """Hook the loop calls before training: refuse loop options the method cannot honour
        (raise :class:`fewstep.errors.FewstepError` saying which option and what to pass instead)."""

    def begin_iteration(self, nimg: int, total_nimg: int) -> None:
        """Hook before each iteration (learning-rate schedules, stage switches)."""

    def end_iteration(self, nimg: int) -> None:
        """Hook after each iteration (e.g. target-network updates)."""

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Method state beyond nets/optimisers to checkpoint: (tensors, JSON)."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass

    # ---- the student -------------------------------------------------------------------
    @abc.abstractmethod
    def export_config(self) -> dict:
        """The model-checkpoint config (see :mod:`fewstep.model`) describing the student."""

    def student_model(self, net: nn.Module):
        """A :class:`fewstep.model.FewstepModel` around ``net`` (EMA or live weights)."""
        from ..model import FewstepModel

        return FewstepModel.from_parts(net, self.export_config())

    @classmethod
    def config_help(cls) -> dict[str, str]:
        """Field name -> help text (from ``metadata['help']`` of the config dataclass)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls.Config)}
