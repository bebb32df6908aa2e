"""Backbone size presets sized for a 2-core CPU.

``preset_net(dataset)`` returns a JSON-ready config dict for :func:`build_net`.
The image presets trade capacity for speed so that a teacher trains to good
samples in ~25 minutes on 2 CPU cores (timings in ``docs`` / the module
report); point clouds get a residual MLP.
"""
from __future__ import annotations

from ..config import from_dict, to_dict
from ..errors import FewstepError
from .mlp import MLPConfig
from .unet import UNetConfig

SIZES = ("tiny", "small", "base")

#: 28x28 (mnist5k): 1x28x28 folded to 4x14x14; levels 14, 7, 4; attention at 7x7 and in the middle (4x4).
MNIST = dict(in_channels=1, channel_mult=[1, 2, 2], attn_resolutions=[7], pixel_unshuffle=2, dropout=0.1)
#: <=12 px (digits 8x8): levels 8, 4; attention in the middle (4x4).
DIGITS = dict(in_channels=1, channel_mult=[1, 2], attn_resolutions=[], pixel_unshuffle=1, dropout=0.1)
#: larger images: four levels after a 2x unshuffle.
LARGE = dict(channel_mult=[1, 2, 2, 2], attn_resolutions=[], pixel_unshuffle=2, dropout=0.1)
#: width per size (UNet model_channels, num_blocks) and MLP (width, depth).
UNET_SIZES = {"tiny": (16, 1), "small": (32, 1), "base": (64, 2)}
MLP_SIZES = {"tiny": (128, 2), "small": (256, 3), "base": (512, 4)}


def _image_preset(shape: tuple[int, ...], size: str) -> dict:
    c, h, w = shape
    side = max(h, w)
    base = dict(DIGITS if side <= 12 else MNIST if side <= 32 else LARGE)
    base["model_channels"], base["num_blocks"] = UNET_SIZES[size]
    u = base["pixel_unshuffle"]
    if h % u or w % u:
        base["pixel_unshuffle"] = u = 1
    base.update(img_resolution=side, in_channels=c)
    res = UNetConfig(img_resolution=side, pixel_unshuffle=u, channel_mult=base["channel_mult"]).resolutions
    while len(base["channel_mult"]) > 1 and res[len(base["channel_mult"]) - 1] < 2:
        base["channel_mult"] = base["channel_mult"][:-1]
    base["attn_resolutions"] = [r for r in base["attn_resolutions"] if r in res[:len(base["channel_mult"])]]
    return base


def preset_net(dataset, *, size: str = "small", num_classes: int = 0, **overrides) -> dict:
    """Config dict of the default backbone for ``dataset``.

    Args:
        dataset: a built-in dataset name (see ``fewstep.data.DATASETS``), ``"mixture:<preset>"``
            / a path (loaded to read its shape), or a loaded ``fewstep.data.Dataset``.
        size: ``"tiny"`` (fastest), ``"small"`` (default: the 2-core CPU teacher) or ``"base"``
            (4x the width of small and two blocks per level: for a GPU or long runs).
        num_classes: make the net class-conditional with this many classes (0 = unconditional).
        **overrides: any config field (e.g. ``model_channels=64``).
    """
    from ..data import SPECS, Dataset, load_dataset

    if size not in SIZES:
        raise FewstepError(f"preset size must be one of {SIZES}, got {size!r}")
    if isinstance(dataset, Dataset):
        kind, shape = dataset.kind, dataset.sample_shape
    elif isinstance(dataset, str) and dataset.lower() in SPECS:
        spec = SPECS[dataset.lower()]
        kind, shape = spec.kind, spec.sample_shape
    elif isinstance(dataset, str):
        ds = load_dataset(dataset, split="all", n=16)
        kind, shape = ds.kind, ds.sample_shape
    else:
        raise FewstepError(f"preset_net needs a dataset name or a Dataset, got {type(dataset).__name__}")
    if kind == "points":
        width, depth = MLP_SIZES[size]
        cfg = dict(dim=int(shape[0]), width=max(width, 4 * int(shape[0])), depth=depth)
        cls, name = MLPConfig, "mlp"
    else:
        cfg = _image_preset(tuple(shape), size)
        cls, name = UNetConfig, "unet"
    cfg.update(num_classes=int(num_classes), name=name)
    cfg.update(overrides)
    return to_dict(from_dict(cls, cfg, where=f"preset_net({dataset!r})"))
