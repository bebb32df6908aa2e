"""The :class:`Dataset` container and the affine map between raw and model space.

Model space is what every network in fewstep sees (DESIGN §1): images are NCHW
floats in [-1, 1]; point clouds are standardised to zero mean and a
per-coordinate standard deviation of 0.5 (= σ_data). An :class:`Affine` records
the map back to the user's units so that samples can be saved as images in
[0, 1] or as points in the original coordinates; it is a plain config
dataclass, so a checkpoint can store it in ``config.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import require
from ..errors import FewstepError

KINDS = ("points", "images")


@dataclass(frozen=True)
class Affine:
    """``model = (raw − offset) · scale`` and ``raw = model / scale + offset``.

    ``offset``/``scale`` hold one value (images: shared by all pixels) or one per
    coordinate (points). ``clamp`` is the raw range that :meth:`from_model`
    clips to (``[0, 1]`` for images), or ``None``.
    """

    offset: list[float]
    scale: list[float]
    clamp: list[float] | None = None

    def validate(self) -> None:
        require(len(self.offset) == len(self.scale) and len(self.offset) >= 1,
                f"Affine needs offset and scale of equal non-zero length, got "
                f"{len(self.offset)} and {len(self.scale)}")
        require(all(np.isfinite(self.offset)) and all(np.isfinite(self.scale)),
                "Affine offset/scale must be finite")
        require(all(s != 0 for s in self.scale), "Affine scale must be non-zero")
        require(self.clamp is None or (len(self.clamp) == 2 and self.clamp[0] < self.clamp[1]),
                f"Affine clamp must be [low, high] with low < high, got {self.clamp}")

    @classmethod
    def identity(cls, dim: int = 1) -> "Affine":
        return cls(offset=[0.0] * dim, scale=[1.0] * dim)

    @classmethod
    def images(cls) -> "Affine":
        """[0, 1] pixels ↔ [−1, 1] model space."""
        return cls(offset=[0.5], scale=[2.0], clamp=[0.0, 1.0])

    def _params(self, like: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        off = torch.tensor(self.offset, dtype=like.dtype, device=like.device)
        sc = torch.tensor(self.scale, dtype=like.dtype, device=like.device)
        if off.numel() > 1:  # per-coordinate values live on ``channel_dim``
            shape = [1] * like.ndim
            shape[channel_dim] = off.numel()
            off, sc = off.reshape(shape), sc.reshape(shape)
        return off, sc

    def to_model(self, raw, channel_dim: int = -1) -> torch.Tensor:
        """Raw units → model space (float32)."""
        raw = torch.as_tensor(raw)
        if not raw.is_floating_point():
            raw = raw.float()
        raw = raw.to(torch.float32) if raw.dtype == torch.float64 else raw
        off, sc = self._params(raw, channel_dim)
        return (raw - off) * sc

    def from_model(self, x: torch.Tensor, channel_dim: int = -1, clamp: bool = True) -> torch.Tensor:
        """Model space → raw units (clipped to ``clamp`` when set and ``clamp=True``)."""
        off, sc = self._params(x, channel_dim)
        raw = x / sc + off
        if clamp and self.clamp is not None:
            raw = raw.clamp(self.clamp[0], self.clamp[1])
        return raw


def _index(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx.to(t.device)]


def stratified_split(n: int, n_test: int, labels: torch.Tensor | None = None,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic shuffled split of ``range(n)`` into (train, test) index tensors.

    With ``labels`` the test set holds each class in proportion to its size
    (largest-remainder rounding so it has exactly ``n_test`` items). Both parts
    are returned in a shuffled order that depends only on ``seed``.
    """
    if not 0 <= n_test <= n:
        raise FewstepError(f"cannot hold out {n_test} of {n} items for a test split")
    g = torch.Generator().manual_seed(int(seed))
    if labels is None or n_test == 0:
        perm = torch.randperm(n, generator=g)
        return perm[n_test:], perm[:n_test]
    labels = labels.cpu()
    classes = torch.unique(labels)
    counts = torch.stack([(labels == c).sum() for c in classes]).double()
    quota = counts * n_test / n
    take = quota.floor().long()
    rest = n_test - int(take.sum())
    if rest > 0:  # largest remainders get one more
        order = torch.argsort(quota - take.double(), descending=True, stable=True)
        take[order[:rest]] += 1
    train, test = [], []
    for c, k in zip(classes, take):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        test.append(idx[:k])
        train.append(idx[k:])
    train, test = torch.cat(train), torch.cat(test)
    return (train[torch.randperm(train.numel(), generator=g)],
            test[torch.randperm(test.numel(), generator=g)])


@dataclass(repr=False, eq=False)
class Dataset:
    """A dataset in model space, plus what is needed to map samples back.

    Attributes:
        name: registry name or the user path it came from.
        x: float32 tensor ``[N, *sample_shape]`` in model space.
        labels: LongTensor ``[N]`` with values in ``0..num_classes−1``, or ``None``.
        num_classes: number of classes (0 when unlabelled).
        kind: ``"points"`` (``x`` is ``[N, D]``) or ``"images"`` (``x`` is NCHW).
        affine: the raw ↔ model map (:meth:`to_model`, :meth:`from_model`).
        split_name: ``"train"``, ``"test"``, ``"all"`` or a description of a subset.
        class_names: optional names of the classes (folder names, original label values).
        notes: what the loader assumed (pixel range, layout, standardisation).
    """

    name: str
    x: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    kind: str
    affine: Affine
    split_name: str = "all"
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FewstepError(f"dataset kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.x, torch.Tensor) or self.x.dtype != torch.float32:
            raise FewstepError("Dataset.x must be a float32 tensor")
        want = 2 if self.kind == "points" else 4
        if self.x.ndim != want:
            raise FewstepError(f"{self.kind} dataset needs a {want}-D tensor, got shape {tuple(self.x.shape)}")
        if self.labels is not None:
            if self.labels.dtype != torch.long or self.labels.shape != (self.x.shape[0],):
                raise FewstepError(f"labels must be a LongTensor of shape [{self.x.shape[0]}], got "
                                   f"{self.labels.dtype} {tuple(self.labels.shape)}")
            if self.num_classes <= 0:
                raise FewstepError("a labelled dataset needs num_classes > 0")
        elif self.num_classes != 0:
            raise FewstepError("an unlabelled dataset must have num_classes = 0")

    # --- shape and size -------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(D,)`` for points, ``(C, H, W)`` for images."""
        return tuple(self.x.shape[1:])

    @property
    def dim(self) -> int:
        """Number of values in one sample."""
        return int(np.prod(self.sample_shape))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i):
        """``(x[i], labels[i] or None)``."""
        return self.x[i], (None if self.labels is None else self.labels[i])

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, split={self.split_name!r}, kind={self.kind!r}, "
                f"n={len(self)}, sample_shape={self.sample_shape}, num_classes={self.num_classes})")

    # --- the affine map -------------------------------------------------------------
    @property
    def _channel_dim(self) -> int:
        return -1 if self.kind == "points" else -3

    def to_model(self, raw) -> torch.Tensor:
        """Raw units → model space. Images: floats in [0, 1], or integer pixels by their dtype (uint8:
        [0, 255]; uint16: [0, 65535]; other integer types must be converted first, their range is not
        known from a batch)."""
        raw = torch.as_tensor(raw)
        if self.kind == "images" and not raw.is_floating_point():
            top = {torch.uint8: 255.0, torch.uint16: 65535.0}.get(raw.dtype)
            if top is None:
                raise FewstepError(f"to_model: integer pixels of dtype {raw.dtype} have no known range; pass "
                                   "uint8 (0..255), uint16 (0..65535) or floats in [0, 1]")
            raw = raw.float() / top
        return self.affine.to_model(raw, self._channel_dim)

    def from_model(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Model space → raw units: images as [0, 1] floats (clipped unless ``clamp=False``),
        points in the original coordinates."""
        return self.affine.from_model(x, self._channel_dim, clamp=clamp)

    # --- subsets --------------------------------------------------------------------
    def subset(self, index, split_name: str | None = None) -> "Dataset":
        """A new dataset holding ``x[index]`` (same affine, classes and notes)."""
        idx = torch.as_tensor(index)
        idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long()  # a mask selects, not indexes
        return Dataset(self.name, self.x[idx.to(self.x.device)], _index(self.labels, idx),
                       self.num_classes, self.kind, self.affine,
                       split_name or f"{self.split_name}[subset]", self.class_names, list(self.notes))

    def take(self, n: int) -> "Dataset":
        """The first ``n`` items (stored order is already shuffled for built-in splits)."""
        if n < 1:
            raise FewstepError(f"n must be a positive number of items, got {n}")
        return self.subset(torch.arange(min(int(n), len(self))), self.split_name)

    def split(self, test_fraction: float = 0.1, *, seed: int = 0,
              stratify: bool = True) -> tuple["Dataset", "Dataset"]:
        """Deterministic held-out split: ``(train, test)`` with ``round(test_fraction·N)`` test items,
        stratified by label when labels exist and ``stratify`` is true."""
        if not 0.0 < test_fraction < 1.0:
            raise FewstepError(f"test_fraction must be in (0, 1), got {test_fraction}")
        n_test = int(round(test_fraction * len(self)))
        if n_test < 1 or n_test >= len(self):
            raise FewstepError(f"test_fraction={test_fraction} of {len(self)} items leaves an empty "
                               f"train or test part; use a larger dataset or another fraction")
        tr, te = stratified_split(len(self), n_test, self.labels if stratify else None, seed)
        base = self.split_name
        return self.subset(tr, f"{base}/train"), self.subset(te, f"{base}/test")

    def to(self, device) -> "Dataset":
        """A copy with tensors on ``device``."""
        return Dataset(self.name, self.x.to(device),
                       None if self.labels is None else self.labels.to(device),
                       self.num_classes, self.kind, self.affine, self.split_name,
                       self.class_names, list(self.notes))

    # --- reporting ------------------------------------------------------------------
    def class_counts(self) -> list[int]:
        """Items per class (empty list when unlabelled)."""
        if self.labels is None:
            return []
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes).tolist()

    def meta(self) -> dict:
        """JSON-ready facts a checkpoint needs to use samples without reloading the data."""
        from ..config import to_dict
        return {"name": self.name, "kind": self.kind, "sample_shape": list(self.sample_shape),
                "num_classes": self.num_classes, "class_names": self.class_names,
                "affine": to_dict(self.affine)}

    def describe(self) -> str:
        """A short human-readable summary (shape, range, classes, assumptions)."""
        x = self.x
        lines = [f"dataset {self.name!r} ({self.split_name}): {len(self)} {self.kind}, "
                 f"sample shape {self.sample_shape}"]
        if len(self):
            lines.append(f"  model space: min {x.min().item():.3f}, max {x.max().item():.3f}, "
                         f"mean {x.mean().item():.3f}, std {x.std().item() if x.numel() > 1 else 0.0:.3f}")
        if self.num_classes:
            names = self.class_names or [str(i) for i in range(self.num_classes)]
            shown = ", ".join(f"{n}:{c}" for n, c in zip(names, self.class_counts()))
            lines.append(f"  {self.num_classes} classes ({shown})")
        else:
            lines.append("  unlabelled")
        a = self.affine
        lines.append(f"  raw = model / {_fmt(a.scale)} + {_fmt(a.offset)}"
                     + (f", clipped to [{a.clamp[0]:g}, {a.clamp[1]:g}]" if a.clamp else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(v: list[float]) -> str:
    return f"{v[0]:.4g}" if len(v) == 1 else "[" + ", ".join(f"{t:.4g}" for t in v) + "]"
