"""User data: ``.npy`` / ``.npz`` arrays and folders of image files.

* ``.npy``: a 2-D array is a point cloud ``[N, D]``; a 3-D ``[N, H, W]`` or 4-D
  (NCHW or NHWC) array is a stack of images.
* ``.npz``: the data under ``x``, ``images`` or ``points`` (the key name forces
  the kind), optional labels under ``labels`` or ``y``.
* folder: png/jpg/bmp/gif/webp/tif files, either all in the folder (unlabelled)
  or one sub-folder per class (labels follow the sorted sub-folder names).

Points are standardised per coordinate (mean 0, std 0.5) with statistics of the
whole file, so train and test parts share one map. Every assumption the loader
makes is recorded in ``Dataset.notes``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..diffusion.denoiser import SIGMA_DATA
from ..errors import FewstepError
from .dataset import Affine, Dataset
from .images import images_to_unit

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz")
DATA_KEYS = ("x", "images", "points")
LABEL_KEYS = ("labels", "y")


def load_path(path: str | Path) -> Dataset:
    """Load a user file or folder as one un-split :class:`Dataset` (``split_name="all"``), named by its
    absolute path (a model trained on it finds it again from any working directory)."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        return load_image_folder(path)
    if not path.is_file():
        raise FewstepError(f"data path not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return from_arrays(str(path), _load_npy(path), None)
    if suffix == ".npz":
        return load_npz(path)
    if suffix in IMAGE_SUFFIXES:
        raise FewstepError(f"{path} is a single image; put the images in a folder and pass the folder")
    raise FewstepError(f"cannot read {path}: supported data files are {', '.join(ARRAY_SUFFIXES)} "
                       f"and folders of image files ({', '.join(IMAGE_SUFFIXES)})")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise FewstepError(f"{path}: cannot read the array ({e}); save plain numeric arrays "
                           f"(object arrays need pickling, which fewstep refuses)") from None
    except OSError as e:
        raise FewstepError(f"{path}: not a valid .npy file ({e})") from None


def load_npz(path: Path) -> Dataset:
    """An ``.npz`` with ``x``/``images``/``points`` and optional ``labels``/``y``."""
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise FewstepError(f"{path}: not a readable .npz file ({e})") from None
    with z:
        keys = list(z.files)
        found = [k for k in DATA_KEYS if k in keys]
        if len(found) != 1:
            what = "none of" if not found else "more than one of"
            raise FewstepError(f"{path}: holds {what} the data keys {list(DATA_KEYS)} (keys present: "
                               f"{keys}); save with np.savez(path, x=data, labels=labels)")
        lab_keys = [k for k in LABEL_KEYS if k in keys]
        if len(lab_keys) > 1:
            raise FewstepError(f"{path}: has both 'labels' and 'y'; keep one of them")
        try:
            data = z[found[0]]
            labels = z[lab_keys[0]] if lab_keys else None
        except ValueError as e:
            raise FewstepError(f"{path}: cannot read the arrays ({e}); save plain numeric arrays") from None
    kind = {"images": "images", "points": "points"}.get(found[0])
    return from_arrays(str(path), data, labels, kind=kind)


def from_arrays(name: str, data, labels=None, *, kind: str | None = None) -> Dataset:
    """Validate a user array (and labels) and build an un-split :class:`Dataset`.

    ``kind`` forces ``"points"`` or ``"images"``; by default 2-D arrays are points and
    3-D/4-D arrays images.
    """
    data = np.asarray(data)
    if data.dtype.kind not in "biuf":
        raise FewstepError(f"{name}: data must be a numeric array (bool, integer or float), "
                           f"got dtype {data.dtype}")
    if data.ndim == 0 or data.shape[0] == 0 or data.size == 0:
        raise FewstepError(f"{name}: the data array is empty (shape {data.shape})")
    if kind is None:
        kind = "points" if data.ndim == 2 else "images" if data.ndim in (3, 4) else None
        if kind is None:
            raise FewstepError(f"{name}: cannot use a {data.ndim}-D array of shape {data.shape}: "
                               f"pass points as [N, D] or images as [N, H, W], NCHW or NHWC")
    if kind == "points":
        ds = _points(name, data)
    elif kind == "images":
        x, notes = images_to_unit(data, name)
        ds = Dataset(name, Affine.images().to_model(x, -3).contiguous(), None, 0, "images",
                     Affine.images(), "all", notes=notes)
    else:
        raise FewstepError(f"kind must be 'points' or 'images', got {kind!r}")
    if labels is not None:
        ds = with_labels(ds, labels)
    return ds


def _points(name: str, data: np.ndarray) -> Dataset:
    if data.ndim != 2:
        raise FewstepError(f"{name}: points must be a 2-D [N, D] array, got shape {data.shape}")
    pts = data.astype(np.float64)
    if not np.isfinite(pts).all():
        rows = np.nonzero(~np.isfinite(pts).all(1))[0]
        raise FewstepError(f"{name}: {len(rows)} point(s) contain NaN or infinite values (first at row "
                           f"{rows[0]}); drop those rows before loading")
    mean, std = pts.mean(0), pts.std(0)
    notes = [f"{name}: read {data.shape} as {data.shape[0]} points in {data.shape[1]}-D; standardised "
             f"per coordinate to mean 0, std {SIGMA_DATA} (statistics of the whole file)"]
    flat = std <= 1e-12 * max(1.0, float(np.abs(pts).max()))
    if flat.any():
        notes.append(f"{name}: coordinate(s) {np.nonzero(flat)[0].tolist()} are constant; they are only "
                     f"centred, not rescaled")
        std = np.where(flat, SIGMA_DATA, std)
    affine = Affine(offset=[float(m) for m in mean], scale=[float(SIGMA_DATA / s) for s in std])
    x = affine.to_model(torch.from_numpy(pts)).to(torch.float32).contiguous()
    return Dataset(name, x, None, 0, "points", affine, "all", notes=notes)


def with_labels(ds: Dataset, labels) -> Dataset:
    """Attach validated labels, remapping arbitrary label values to ``0..K−1``."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != len(ds):
        raise FewstepError(f"{ds.name}: labels must be a 1-D array with one entry per item ({len(ds)}), "
                           f"got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not (y == np.round(y)).all():
            raise FewstepError(f"{ds.name}: labels must be whole numbers (class indices); found "
                               f"non-integer or NaN values")
        y = y.astype(np.int64)
    if y.dtype.kind not in "iub" and y.dtype.kind not in "US":
        raise FewstepError(f"{ds.name}: unsupported label dtype {y.dtype}; use integers or strings")
    values, idx = np.unique(y, return_inverse=True)
    k = len(values)
    names = None
    notes = list(ds.notes)
    contiguous = y.dtype.kind in "iub" and values[0] == 0 and values[-1] == k - 1
    if not contiguous:
        names = [str(v) for v in values]
        notes.append(f"{ds.name}: label values {names[:10]}{'...' if k > 10 else ''} mapped to 0..{k - 1}")
    return Dataset(ds.name, ds.x, torch.from_numpy(idx.astype(np.int64).reshape(-1)), int(k), ds.kind,
                   ds.affine, ds.split_name, names, notes)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder: Path) -> Dataset:
    """A folder of equally sized images, flat (unlabelled) or in class sub-folders."""
    top = _image_files(folder)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [(d.name, _image_files(d)) for d in subdirs]
    classes = [(n, f) for n, f in classes if f]
    if top and classes:
        raise FewstepError(f"{folder}: has images both at the top level and in class sub-folders "
                           f"{[n for n, _ in classes]}; move the top-level images into a class folder "
                           f"(or remove the sub-folders for unlabelled data)")
    if not top and not classes:
        raise FewstepError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found in the folder "
                           f"or its immediate sub-folders")
    files = top if top else [f for _, fs in classes for f in fs]
    labels = None if top else np.concatenate([np.full(len(fs), i) for i, (_, fs) in enumerate(classes)])
    arr, note = _read_images(files, folder)
    ds = from_arrays(str(folder), arr, None, kind="images")
    ds.notes.insert(0, note)
    if labels is not None:
        ds = with_labels(ds, labels)
        ds.class_names = [n for n, _ in classes]
        ds.notes.append(f"{folder}: {len(classes)} classes from sub-folders {ds.class_names}")
    return ds


def _read_images(files: list[Path], folder: Path) -> tuple[np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError
    images, modes, sizes = [], set(), {}
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                modes.add(im.mode)
                sizes.setdefault(im.size, f)
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise FewstepError(f"{f}: cannot read this image ({e}); remove or re-save it") from None
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h} (e.g. {p.name})" for (w, h), p in list(sizes.items())[:4])
        raise FewstepError(f"{folder}: images have different sizes: {shown}; resize them all to one size "
                           f"(e.g. with PIL's Image.resize) before loading")
    sixteen = {"I;16", "I;16B", "I;16L"}
    deep = sixteen | {"I", "F"}
    if modes <= sixteen:  # 16-bit files: [0, 65535] whatever the values (a dark set is not 8-bit)
        arr = np.stack([np.asarray(im) for im in images]).astype(np.float32) / 65535.0
        return arr, f"{folder}: read {len(files)} 16-bit grayscale image file(s) as [0, 65535]"
    if modes <= deep:  # 32-bit integer or float grayscale: keep the values, the range is inferred later
        arr = np.stack([np.asarray(im) for im in images])
        arr = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.astype(np.int64)
        return arr, (f"{folder}: read {len(files)} high-bit-depth grayscale image file(s) of modes "
                     f"{sorted(modes)}")
    gray = modes <= {"1", "L"} | deep
    mode = "L" if gray else "RGB"
    arr = np.stack([np.asarray(im.convert(mode), dtype=np.uint8) for im in images])
    dropped = " (alpha dropped)" if modes & {"RGBA", "LA", "PA"} else ""
    note = (f"{folder}: read {len(files)} image file(s) of modes {sorted(modes)} as 8-bit "
            f"{'grayscale' if gray else 'RGB'}{dropped}")
    return arr, note
