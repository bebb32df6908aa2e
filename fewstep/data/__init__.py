"""Datasets in model space: 2-D toy sets, exact mixtures, sklearn digits, MNIST-5k, user files.

Public API::

    load_dataset(name_or_path, *, split="train", n=None, seed=0) -> Dataset
    DATASETS                       # name -> one-line description
    Dataset                        # x, labels, num_classes, kind, sample_shape, to_model/from_model, split
    infinite_batches(dataset, batch_size, generator) -> InfiniteBatches
"""
from .batches import InfiniteBatches, infinite_batches
from .dataset import Affine, Dataset, stratified_split
from .files import from_arrays
from .registry import DATASETS, SPECS, DatasetSpec, dataset_help, load_dataset

__all__ = [
    "Affine", "DATASETS", "Dataset", "DatasetSpec", "InfiniteBatches", "SPECS", "dataset_help",
    "from_arrays", "infinite_batches", "load_dataset", "stratified_split",
]
