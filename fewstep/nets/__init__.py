"""Raw backbones ``F(x_in, c_noise, labels=None)``; wrap one in ``EDMPrecond`` to get a denoiser.

Public API::

    MLP(config: MLPConfig)         # vectors [N, D] (or any flattened input)
    UNet(config: UNetConfig)       # images NCHW
    build_net(config: dict, *, seed=None) -> nn.Module   # dispatch on config["name"]
    net_config(net) -> dict        # JSON-ready config that rebuilds ``net``
    preset_net(dataset, *, num_classes=0, **overrides) -> dict
    count_params(net) -> int
"""
from .build import ARCHS, build_net, count_params, net_config
from .embedding import ConditionEmbedding, FourierEmbedding, PositionalEmbedding, resolve_labels
from .mlp import MLP, MLPConfig
from .presets import preset_net
from .unet import UNet, UNetConfig

__all__ = [
    "ARCHS", "ConditionEmbedding", "FourierEmbedding", "MLP", "MLPConfig", "PositionalEmbedding", "UNet",
    "UNetConfig", "build_net", "count_params", "net_config", "preset_net", "resolve_labels",
]
