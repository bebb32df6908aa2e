"""Build backbones from JSON-ready config dicts and read the config back from a net."""
from __future__ import annotations

import torch
from torch import nn

from ..config import from_dict, to_dict
from ..errors import FewstepError
from .mlp import MLP, MLPConfig
from .unet import UNet, UNetConfig

ARCHS: dict[str, tuple[type, type]] = {"mlp": (MLP, MLPConfig), "unet": (UNet, UNetConfig)}


def build_net(config: dict, *, seed: int | None = None) -> nn.Module:
    """Instantiate the backbone named by ``config["name"]`` (``"mlp"`` | ``"unet"`` | any name in
    :data:`ARCHS`, which maps a name to ``(module class, config dataclass)``).

    ``seed`` makes the initial weights reproducible without touching the global RNG.
    Unknown names, unknown keys and bad values raise :class:`FewstepError`.
    """
    if not isinstance(config, dict):
        raise FewstepError(f"a net config must be a dict with a 'name' key, got {type(config).__name__}")
    name = config.get("name")
    if name not in ARCHS:
        raise FewstepError(f"unknown net name {name!r} in config; valid names: {sorted(ARCHS)}")
    net_cls, cfg_cls = ARCHS[name]
    cfg = from_dict(cfg_cls, config, where=f"net config ({name})")
    if seed is None:
        return net_cls(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return net_cls(cfg)


def net_config(net: nn.Module) -> dict:
    """The JSON-ready config that :func:`build_net` turns back into this architecture."""
    cfg = getattr(net, "config", None)
    if not any(isinstance(cfg, c) for _, c in ARCHS.values()):
        inner = getattr(net, "net", None)  # e.g. EDMPrecond(net)
        if inner is not None and inner is not net:
            return net_config(inner)
        raise FewstepError(f"{type(net).__name__} is not a fewstep backbone (no MLP/UNet config)")
    return to_dict(cfg)


def count_params(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def _register_two_head() -> None:
    # the "both" parameterisation of step distillation (fewstep/nets/two_head.py)
    from .two_head import TwoHead, TwoHeadConfig

    ARCHS["two-head"] = (TwoHead, TwoHeadConfig)


_register_two_head()
