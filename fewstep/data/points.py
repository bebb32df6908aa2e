"""Synthetic 2-D point sets and samples from the exact Gaussian-mixture presets.

Every generator is a pure function of ``(n, seed)``. The sklearn-style shapes
(checkerboard, swiss roll, moons) are standardised to zero mean and
per-coordinate standard deviation 0.5 with a *fixed* affine measured once on a
large reference sample, so train and test samples (and any ``n``) share the
same map. The mixture presets of :mod:`fewstep.diffusion.mixture` are already
in model space: their affine is the identity and the labels are the mixture
component of each point.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..diffusion.denoiser import SIGMA_DATA
from ..errors import FewstepError
from .dataset import Affine, Dataset

_REFERENCE_N = 100_000
_REFERENCE_SEED = 123_456_789


def checkerboard(n: int, seed: int) -> tuple[np.ndarray, None]:
    """Uniform density on the dark squares of a 4x4 board spanning [−4, 4]² (FFJORD's toy)."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    x2 = (torch.rand(n, generator=g, dtype=torch.float64)
          - torch.randint(0, 2, (n,), generator=g).double() * 2)
    x2 = x2 + torch.floor(x1) % 2
    return (torch.stack([x1, x2], 1) * 2).numpy(), None


def swissroll(n: int, seed: int) -> tuple[np.ndarray, None]:
    """sklearn's swiss roll projected to its (x, z) plane, noise 0.5."""
    from sklearn.datasets import make_swiss_roll
    x, _ = make_swiss_roll(n, noise=0.5, random_state=seed)
    return x[:, [0, 2]], None


def moons(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's two interleaving half-moons, noise 0.06; labels are the moon (0/1)."""
    from sklearn.datasets import make_moons
    x, y = make_moons(n, noise=0.06, random_state=seed)
    return x, y


SHAPES = {"checkerboard": checkerboard, "swissroll": swissroll, "moons": moons}
MIXTURES = {"8gaussians": "ring8", "25gaussians": "grid25"}


@functools.lru_cache(maxsize=None)
def shape_affine(name: str) -> Affine:
    """Fixed standardisation of a named shape, measured on a large seeded reference sample."""
    ref, _ = SHAPES[name](_REFERENCE_N, _REFERENCE_SEED)
    mean, std = ref.mean(0), ref.std(0)
    return Affine(offset=[float(m) for m in mean], scale=[float(SIGMA_DATA / s) for s in std])


def load_shape(name: str, n: int, seed: int, split_name: str) -> Dataset:
    """``n`` points of a named 2-D shape drawn with ``seed``, in model space."""
    pts, y = SHAPES[name](n, seed)
    affine = shape_affine(name)
    x = affine.to_model(torch.as_tensor(pts, dtype=torch.float32))
    labels = None if y is None else torch.as_tensor(y, dtype=torch.long)
    return Dataset(name, x.contiguous(), labels, 0 if y is None else 2, "points", affine, split_name,
                   notes=[f"generated with seed {seed}; standardised with a fixed affine "
                          f"(mean 0, std {SIGMA_DATA} per coordinate)"])


def mixture_preset(preset: str):
    """``fewstep.diffusion.mixture.preset(preset)``, with a clear error if it is missing."""
    try:
        from ..diffusion import mixture
    except ImportError as e:  # pragma: no cover - only while the module is being written
        raise FewstepError(f"Gaussian-mixture datasets need fewstep.diffusion.mixture ({e})") from None
    return mixture.preset(preset)


def load_mixture(name: str, preset: str, n: int, seed: int, split_name: str) -> Dataset:
    """``n`` exact samples of a mixture preset (already model space); labels = component index."""
    gm = mixture_preset(preset)
    g = torch.Generator().manual_seed(seed)
    x, comp = gm.sample(n, generator=g, return_components=True)
    x = torch.as_tensor(x).to(torch.float32).cpu().contiguous()
    labels = torch.as_tensor(comp).to(torch.long).cpu()
    k = _num_components(gm, labels)
    return Dataset(name, x, labels, k, "points", Affine.identity(x.shape[1]), split_name,
                   notes=[f"exact samples of mixture preset {preset!r} (seed {seed}); labels are "
                          f"mixture components; already in model space"])


def _num_components(gm, labels: torch.Tensor) -> int:
    for attr in ("num_components", "k", "n_components"):
        v = getattr(gm, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    for attr in ("weights", "means", "logits"):
        v = getattr(gm, attr, None)
        if isinstance(v, torch.Tensor) and v.ndim >= 1:
            return int(v.shape[0])
    return int(labels.max().item()) + 1 if labels.numel() else 1
