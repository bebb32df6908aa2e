"""Backbone size presets sized for a 2-core CPU.

``preset_net(dataset, size=...)`` returns a JSON-ready config dict for
:func:`build_net`. Costs (parameters; training FLOPs of one EDM step, forward
+ backward through ``EDMPrecond``, batch 64):

=========  ====================================  ===================================
size       mnist5k (28x28, unshuffle 2)          digits (8x8)
=========  ====================================  ===================================
tiny       0.35 M;  6.1 GFLOP (16 ch, [1,2,2])    0.20 M;  1.7 GFLOP (16 ch, [1,2])
small      0.76 M;  9.3 GFLOP (16 ch, [1,2,4])    0.78 M;  6.9 GFLOP (32 ch, [1,2])
base       1.37 M; 24.0 GFLOP (32 ch, [1,2,2])    3.09 M; 27.4 GFLOP (64 ch, [1,2])
large      7.66 M; 132  GFLOP (64 ch, 2 blocks)   7.33 M; 39.4 GFLOP (64 ch, [1,2,2])
=========  ====================================  ===================================

Points use a residual MLP: tiny 128x2, small 256x3 (0.89 M, 0.34 GFLOP),
base 512x4, large 1024x4. On the 2-core AMD EPYC development machine, with the
other core busy, one training step at batch 64 took about 180 ms (mnist5k
small), 270 ms (base), 115 ms (tiny), 80-90 ms (digits small) and 8-11 ms
(points) with ``OMP_NUM_THREADS=1``; convolutions run at roughly 60-130
GFLOP/s per core there, so no conv net of ~1 M parameters on 14x14 features
reaches 15 steps/s. ``small`` is the default: it is the cheapest preset whose
capacity sits at the low-resolution levels, and every distillation method
pays the teacher architecture two or three times per step.
"""
from __future__ import annotations

from ..config import from_dict, to_dict
from ..errors import FewstepError
from .mlp import MLPConfig
from .unet import UNetConfig

SIZES = ("tiny", "small", "base", "large")

# Image families: fixed layout plus (model_channels, channel_mult, num_blocks) per size.
#: 13-32 px (mnist5k): 1x28x28 folded to 4x14x14; levels 14, 7, 4; attention at 7x7 and in the middle.
MNIST = dict(layout=dict(attn_resolutions=[7], pixel_unshuffle=2, dropout=0.1),
             sizes={"tiny": (16, [1, 2, 2], 1), "small": (16, [1, 2, 4], 1),
                    "base": (32, [1, 2, 2], 1), "large": (64, [1, 2, 2], 2)})
#: <=12 px (digits 8x8): levels 8, 4 (large: 8, 4, 2); attention in the middle.
DIGITS = dict(layout=dict(attn_resolutions=[], pixel_unshuffle=1, dropout=0.1),
              sizes={"tiny": (16, [1, 2], 1), "small": (32, [1, 2], 1),
                     "base": (64, [1, 2], 1), "large": (64, [1, 2, 2], 2)})
#: >32 px: a 2x unshuffle and four levels.
LARGE = dict(layout=dict(attn_resolutions=[], pixel_unshuffle=2, dropout=0.1),
             sizes={"tiny": (16, [1, 2, 2, 2], 1), "small": (32, [1, 2, 2, 2], 1),
                    "base": (64, [1, 2, 2, 2], 1), "large": (128, [1, 2, 2, 2], 2)})
#: MLP (width, depth) per size (width is at least 4x the data dimension).
MLP_SIZES = {"tiny": (128, 2), "small": (256, 3), "base": (512, 4), "large": (1024, 4)}


def _image_preset(shape: tuple[int, ...], size: str) -> dict:
    c, h, w = shape
    side = max(h, w)
    family = DIGITS if side <= 12 else MNIST if side <= 32 else LARGE
    base = dict(family["layout"])
    base["model_channels"], base["channel_mult"], base["num_blocks"] = family["sizes"][size]
    base["channel_mult"] = list(base["channel_mult"])
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
        size: ``"tiny"``, ``"small"`` (default: the 2-core CPU teacher), ``"base"`` or ``"large"``
            (for a GPU or long runs); see the module docstring for costs.
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
