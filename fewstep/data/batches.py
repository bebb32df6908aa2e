"""An endless, exactly resumable stream of shuffled minibatches.

The stream is the concatenation of epoch permutations; batch ``k`` holds items
``k·B … (k+1)·B − 1`` of it, so batches never drop data and work for datasets
smaller than one batch. Epoch ``e`` is shuffled by ``torch.randperm`` under a
generator seeded with ``base_seed + e``, where ``base_seed`` is drawn once from
the caller's generator. The position is therefore three integers
(``base_seed``, ``epoch``, ``pos``): :meth:`InfiniteBatches.state_dict` saves
them and :meth:`~InfiniteBatches.load_state_dict` continues the same stream
exactly. Batches are cheap index gathers on the dataset's tensors (on whatever
device they live); there are no DataLoader workers.
"""
from __future__ import annotations

import numbers
from typing import Iterator

import torch

from ..errors import FewstepError
from .dataset import Dataset

_SEED_RANGE = 2**62


class InfiniteBatches:
    """Iterator over ``(x, labels)`` minibatches forever (``labels`` is ``None`` if unlabelled)."""

    def __init__(self, dataset: Dataset, batch_size: int, generator: torch.Generator | None = None):
        if len(dataset) == 0:
            raise FewstepError(f"cannot draw batches from the empty dataset {dataset.name!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise FewstepError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.base_seed = int(torch.randint(_SEED_RANGE, (1,), generator=generator).item())
        self.epoch = 0
        self.pos = 0
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed((self.base_seed + self.epoch) % _SEED_RANGE)
            self._perm = torch.randperm(len(self.dataset), generator=g).to(self.dataset.x.device)
        return self._perm

    def next_indices(self) -> torch.Tensor:
        """Indices of the next batch (advances the stream)."""
        parts, need = [], self.batch_size
        while need:
            perm = self._permutation()
            take = perm[self.pos:self.pos + need]
            parts.append(take)
            need -= take.numel()
            self.pos += take.numel()
            if self.pos == perm.numel():
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = self.next_indices()
        labels = self.dataset.labels
        return self.dataset.x[idx], (None if labels is None else labels[idx.to(labels.device)])

    def state_dict(self) -> dict:
        """JSON-ready position in the stream."""
        return {"base_seed": self.base_seed, "epoch": self.epoch, "pos": self.pos,
                "batch_size": self.batch_size, "dataset_len": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by :meth:`state_dict` (the batch size may differ)."""
        try:
            base, epoch, pos, n = (int(state[k]) for k in ("base_seed", "epoch", "pos", "dataset_len"))
        except (KeyError, TypeError, ValueError) as e:
            raise FewstepError(f"batch-iterator state is missing or malformed ({e})") from None
        if n != len(self.dataset):
            raise FewstepError(f"the saved batch stream was over {n} items but the dataset has "
                               f"{len(self.dataset)}; resume with the same dataset (name, split and n)")
        if not (0 <= pos < n and epoch >= 0):
            raise FewstepError(f"batch-iterator state out of range: epoch={epoch}, pos={pos}, n={n}")
        self.base_seed, self.epoch, self.pos, self._perm = base, epoch, pos, None

    @property
    def items_seen(self) -> int:
        """Items drawn so far (for kimg bookkeeping)."""
        return self.epoch * len(self.dataset) + self.pos


def infinite_batches(dataset: Dataset, batch_size: int,
                     generator: torch.Generator | None = None) -> InfiniteBatches:
    """Shuffled ``(x, labels)`` minibatches forever, reproducible from ``generator``'s state
    and resumable via ``state_dict()`` / ``load_state_dict()``."""
    return InfiniteBatches(dataset, batch_size, generator)
