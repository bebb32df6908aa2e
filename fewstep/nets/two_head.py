"""Two output heads mixed as in Salimans & Ho (2022): the "both" student parameterisation.

Progressive distillation (DESIGN §3) lets the student predict x, v, or *both* x and ε,
reconciled per noise level by

    x̂ = σ_t²·x̂_x + α_t·(z_t − σ_t·ε̂)          (VP units, α_t² + σ_t² = 1)

so that the x-head dominates at low SNR (where ε-prediction breaks) and the ε-head at
high SNR. In fewstep's σ-space (z_t = α_t·x, σ_EDM = σ_t/α_t) this reads
x̂ = σ_t²·x̂_x + α_t²·(x − σ·ε̂).

:class:`TwoHead` is a raw backbone (``F(x_in, c_noise, labels)``, to be wrapped by
``EDMPrecond``) around an inner backbone with twice the output channels. Both heads
keep EDM's output scaling, x̂_x = c_skip·x + c_out·F_x and ε̂ = (x − c_skip·x − c_out·F_ε)/σ,
so the mixture above is x̂ = c_skip·x + c_out·(σ_t²·F_x + α_t²·F_ε): the wrapper returns
that blend, with σ read back from EDM's c_noise = ¼·ln σ. Initialising both heads from a
one-head network (:func:`two_head_from`) reproduces that network exactly, which is what
progressive distillation needs (each stage starts from its teacher).

Inner MLPs (whose input and output sizes are tied) see the input padded with zeros to
twice its size; inner UNets get ``out_channels`` doubled.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import require
from ..errors import FewstepError


@dataclass
class TwoHeadConfig:
    """Config of :class:`TwoHead`: the inner backbone's config (with doubled outputs)."""

    inner: dict = field(default_factory=dict)
    name: str = "two-head"

    def validate(self) -> None:
        require(self.name == "two-head", f"TwoHeadConfig.name must be 'two-head', got {self.name!r}")
        require(isinstance(self.inner, dict) and self.inner.get("name") in ("mlp", "unet"),
                "TwoHeadConfig.inner must be an mlp or unet config")


class TwoHead(nn.Module):
    """x-head and ε-head backbone mixed by σ_t² and α_t² (see module docstring)."""

    def __init__(self, config: TwoHeadConfig | None = None, **kwargs):
        super().__init__()
        from .build import build_net

        if config is None:
            config = TwoHeadConfig(**kwargs)
        config.validate()
        self.config = config
        self.inner = build_net(config.inner)
        self.num_classes = int(getattr(self.inner, "num_classes", 0) or 0)
        self.guidance_embedding = bool(getattr(self.inner, "guidance_embedding", False))
        self.path_embedding = bool(getattr(self.inner, "path_embedding", False))
        self._pad = config.inner["name"] == "mlp"

    def heads(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels=None, guidance=None, path=None):
        """The raw outputs (F_x, F_ε), each shaped like ``x_in``."""
        inp = torch.cat([x_in, torch.zeros_like(x_in)], dim=1) if self._pad else x_in
        extra = {k: v for k, v in (("guidance", guidance), ("path", path)) if v is not None}
        out = self.inner(inp, c_noise, labels, **extra)
        f_x, f_eps = out.chunk(2, dim=1)
        return f_x, f_eps

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels=None, guidance=None,
                path=None) -> torch.Tensor:
        f_x, f_eps = self.heads(x_in, c_noise, labels, guidance, path)
        # σ_t² = σ²/(1 + σ²) = sigmoid(ln σ²), with ln σ = 4·c_noise (EDM's c_noise = ¼·ln σ)
        w_x = torch.sigmoid(8.0 * c_noise).reshape((-1,) + (1,) * (x_in.ndim - 1)).to(f_x.dtype)
        return w_x * f_x + (1.0 - w_x) * f_eps  # σ_t²·F_x + α_t²·F_ε


def _doubled_inner_config(config: dict) -> dict:
    cfg = dict(config)
    if cfg["name"] == "mlp":
        cfg["dim"] = 2 * int(cfg.get("dim", 2))
    elif cfg["name"] == "unet":
        cfg["out_channels"] = 2 * int(cfg.get("out_channels") or cfg.get("in_channels", 1))
    else:  # pragma: no cover - validated before
        raise FewstepError(f"no two-head version of backbone {cfg['name']!r}")
    return cfg


@torch.no_grad()
def two_head_from(net: nn.Module) -> TwoHead:
    """A :class:`TwoHead` backbone whose two heads both start as the one-head ``net``.

    Tensors whose size doubles (the output layer; an MLP's input layer, whose extra
    inputs are always zero) get the source weights repeated, so the result computes
    exactly what ``net`` computes.
    """
    from .build import net_config

    if isinstance(net, TwoHead):
        return copy.deepcopy(net)
    src_cfg = net_config(net)
    two = TwoHead(TwoHeadConfig(inner=_doubled_inner_config(src_cfg)))
    src = net.state_dict()
    dst = two.inner.state_dict()
    for k, v in dst.items():
        s = src[k]
        for d in range(s.ndim):
            if v.shape[d] == 2 * s.shape[d] and v.shape[d] != s.shape[d]:
                s = torch.cat([s, s], dim=d)
        if s.shape != v.shape:
            raise FewstepError(f"cannot initialise the two-head network from {type(net).__name__}: "
                               f"{k} has shape {tuple(s.shape)} vs {tuple(v.shape)}")
        v.copy_(s)
    return two.to(next(net.parameters()).device)


__all__ = ["TwoHead", "TwoHeadConfig", "two_head_from"]
