"""One front door for sample quality: :func:`evaluate_samples`, and :func:`fd_floor`.

Images are measured in the feature space of a fewstep feature net (DESIGN §4):
Fréchet distance (FD), KID, precision/recall and the predicted-class histogram,
every key carrying the feature net's name (``fd_mnist5k-featnet``) so the
numbers are never mistaken for Inception FID. Mixtures are measured exactly
(:func:`fewstep.eval.metrics.mixture_metrics`); other point sets by RBF-MMD and
sliced Wasserstein distance to real points.

Protocol for images (the same for samples and for the floor):

* samples are clamped to [-1, 1] and quantised to 8 bits (as EDM does by
  writing PNGs before computing FID); real images get the same treatment;
* non-finite samples are dropped and counted (``nonfinite_fraction``);
* ``n`` samples are compared with ``n`` real images (default reference: a
  fixed random subset of the dataset's *train* split, seed 0), so FD, KID and
  precision/recall are always at equal sample counts;
* :func:`fd_floor` measures held-out *test* images against train images at the
  same ``n`` — the value a perfect generator would reach at that sample count.
  Report it beside every FD.
"""
from __future__ import annotations

import math

import torch

from ..errors import FewstepError
from . import metrics as M
from .feature_net import FeatureNet, asset_paths, load_feature_net

_FEATURE_CACHE: dict = {}


def quantize_images(x: torch.Tensor) -> torch.Tensor:
    """Clamp model-space images to [-1, 1] and round to the 256 levels of an 8-bit PNG."""
    x = x.detach().float().clamp(-1, 1)
    return torch.round((x + 1) * 127.5) / 127.5 - 1


def _dataset_name(dataset) -> str | None:
    if dataset is None:
        return None
    return dataset if isinstance(dataset, str) else getattr(dataset, "name", None)


def has_feature_net(dataset) -> bool:
    """Whether fewstep ships a feature net for ``dataset`` (a name or a Dataset)."""
    name = _dataset_name(dataset)
    return name is not None and asset_paths(name)[0].is_file()


def _resolve_net(feature_net, dataset) -> FeatureNet:
    if isinstance(feature_net, torch.nn.Module):
        if not hasattr(feature_net, "extract"):
            raise FewstepError("feature_net must be a fewstep FeatureNet (with .extract), a dataset name "
                               "or the path of a feature-net .safetensors file")
        return feature_net
    if feature_net is not None:
        return load_feature_net(feature_net)
    name = _dataset_name(dataset)
    if name is None:
        raise FewstepError("evaluating images needs dataset= (to pick the shipped feature net and the "
                           "real images) or feature_net= and reference=")
    from ..teachers.diffusers_adapter import DATA_NAME as DIFFUSERS_DATA

    if name == DIFFUSERS_DATA:
        raise FewstepError("this model comes from a diffusers teacher, which names no dataset: pass the images "
                           "it was trained on with --data (a built-in name, a .npy/.npz file or an image folder)")
    if not asset_paths(name)[0].is_file():
        raise FewstepError(
            f"no feature net is shipped for dataset {name!r}: `fewstep eval ... --inception FILE` measures "
            f"Inception FID on any image data; or train a feature net on labelled images with "
            f"`python -m fewstep.eval.feature_net --dataset {name} --out my_featnet.safetensors` "
            f"and pass --feature-net my_featnet.safetensors (feature_net= in Python)")
    return load_feature_net(name)


def _real_images(dataset, split: str):
    from ..data import load_dataset

    if isinstance(dataset, str):
        return load_dataset(dataset, split=split).x
    if split == "train" and hasattr(dataset, "x"):  # a Dataset object: its images are the reference
        return dataset.x
    name = _dataset_name(dataset)
    if name is None:
        raise FewstepError("cannot find the real images: pass dataset as a name or a Dataset")
    return load_dataset(name, split=split).x


def _subset(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if n >= x.shape[0]:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx]


def _features(net: FeatureNet, x: torch.Tensor, cache_key=None):
    if cache_key is not None:
        key = (id(net), net.name, float(net.head.weight.detach().double().sum())) + cache_key
        if key not in _FEATURE_CACHE:
            if len(_FEATURE_CACHE) > 16:
                _FEATURE_CACHE.clear()
            _FEATURE_CACHE[key] = net.extract(quantize_images(x))
        return _FEATURE_CACHE[key]
    return net.extract(quantize_images(x))


def _drop_nonfinite(samples, labels=None):
    x = torch.as_tensor(samples).detach().cpu()
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if labels is not None:
        labels = torch.as_tensor(labels).cpu()[finite]
    return x[finite], labels, float(1 - finite.double().mean()) if x.shape[0] else 0.0


def evaluate_samples(samples, *, dataset=None, mixture=None, feature_net=None, reference=None,
                     n: int | None = None, labels=None, kid_subset_size: int = 1000,
                     pr_k: int = 3, seed: int = 0) -> dict:
    """Measure ``samples`` (model space) and return a flat JSON-ready dict of metrics.

    Mixtures (``mixture=`` a :class:`~fewstep.diffusion.mixture.GaussianMixture`):
    the exact measures of :func:`~fewstep.eval.metrics.mixture_metrics`
    (``reference`` = true samples to compare with; default: fresh ones).

    Images (``dataset=`` a name or Dataset, and/or ``feature_net=`` a name, path
    or :class:`FeatureNet`): with ``F`` the feature net's name, keys
    ``fd_F``, ``kid_F``, ``kid_std_F``, ``precision_F``, ``recall_F``,
    ``class_hist_F`` (fraction per predicted class), ``class_max_dev_F``
    (max relative deviation from uniform), plus ``label_accuracy_F`` when
    ``labels`` (the classes the samples were conditioned on) are given.
    ``reference`` are real images (default: the dataset's train split);
    ``n`` caps the sample count; the reference is subsampled to the same count.
    ``kid_std_F`` is the spread over KID subsets (0 when ``n <= kid_subset_size``:
    every subset is then the whole set).

    Points without a mixture (``[N, D]`` samples with ``dataset=`` or ``reference=``):
    ``mmd_rbf``, ``mmd_bandwidth`` and ``sliced_wasserstein`` to up to 2,000 real points.

    Common keys: ``kind`` ("images", "mixture" or "points"), ``n``, ``n_reference``,
    ``nonfinite_fraction`` (non-finite samples are dropped before measuring), and
    ``feature_net`` for images.
    """
    if mixture is not None:
        if n is not None:
            samples = torch.as_tensor(samples)[:n]
        return {"kind": "mixture", **M.mixture_metrics(samples, mixture, reference, seed=seed)}

    x, labels, nonfinite = _drop_nonfinite(samples, labels)
    if n is not None:
        x = x[:n]
        labels = None if labels is None else labels[:n]
    if x.ndim == 2:
        return _evaluate_points(x, nonfinite, dataset, reference, seed)
    if x.ndim != 4:
        raise FewstepError(f"samples must be NCHW images or [N, D] points, got shape {list(x.shape)}")
    if x.shape[0] <= pr_k:
        raise FewstepError(f"need more than {pr_k} finite samples to evaluate, got {x.shape[0]}")
    net = _resolve_net(feature_net, dataset)
    net.check_input(x)
    name = net.name
    n_eval = x.shape[0]

    if reference is None:
        if dataset is None:
            raise FewstepError("pass dataset= or reference= (real images) to compare the samples with")
        real = _real_images(dataset, "train")
        cache_key = (dataset, "train") if isinstance(dataset, str) else None
    else:
        real, cache_key = torch.as_tensor(reference).detach().cpu(), None
    net.check_input(real)
    # the class histogram (and label accuracy) use every sample; the distances compare
    # equal sample counts, so they use the first n_eval when there are fewer real images
    all_logits, all_feats = _features(net, x)
    all_labels = labels
    if real.shape[0] < n_eval:
        n_eval = real.shape[0]
    feats = all_feats[:n_eval]
    if cache_key is not None:
        _, real_feats = _features(net, real, cache_key)
        real_feats = _subset(real_feats, n_eval, seed)
    else:
        _, real_feats = _features(net, _subset(real, n_eval, seed))

    kid, kid_std = M.kernel_inception_distance(real_feats, feats, subset_size=kid_subset_size, seed=seed)
    prec, rec = M.precision_recall(real_feats, feats, k=pr_k)
    hist = M.class_histogram(all_logits, net.config.num_classes)
    out = {
        "kind": "images",
        "feature_net": name,
        "n": int(n_eval),
        "n_class_hist": int(all_logits.shape[0]),
        "n_reference": int(real_feats.shape[0]),
        "nonfinite_fraction": nonfinite,
        f"fd_{name}": M.frechet_distance(real_feats, feats),
        f"kid_{name}": kid,
        f"kid_std_{name}": kid_std,
        f"precision_{name}": prec,
        f"recall_{name}": rec,
        f"class_hist_{name}": [round(float(h), 5) for h in hist],
        f"class_max_dev_{name}": M.max_uniform_deviation(hist),
    }
    if all_labels is not None and all_labels.numel() == all_logits.shape[0]:
        out[f"label_accuracy_{name}"] = float((all_logits.argmax(1) == all_labels.long()).double().mean())
    return out


def _evaluate_points(x: torch.Tensor, nonfinite: float, dataset, reference, seed: int) -> dict:
    """Points without a known density: RBF-MMD² and sliced Wasserstein to real points."""
    if reference is None:
        if dataset is None:
            raise FewstepError("point samples need mixture= (exact measures), dataset= or reference=")
        reference = _real_images(dataset, "train")
    ref = torch.as_tensor(reference).detach().cpu().reshape(len(reference), -1)
    dims = math.prod(x.shape[1:])
    if dims != ref.shape[1]:
        raise FewstepError(f"the samples have {dims} coordinates but the reference points {ref.shape[1]}: "
                           "evaluate against the data the model was trained on (--data)")
    if x.shape[0] < 2 or ref.shape[0] < 2:
        raise FewstepError(f"need >= 2 finite samples and reference points, got {x.shape[0]} and {ref.shape[0]}")
    n = min(x.shape[0], ref.shape[0], 2000)
    x, ref = x[:n].double(), _subset(ref, n, seed).double()
    mmd2, bw = M.rbf_mmd2(x, ref)
    return {"kind": "points", "n": int(n), "n_reference": int(n), "nonfinite_fraction": nonfinite,
            "mmd_rbf": mmd2, "mmd_bandwidth": bw, "sliced_wasserstein": M.sliced_wasserstein(x, ref, seed=seed)}


def fd_floor(dataset, n: int | None = None, *, feature_net=None, seed: int = 0) -> float:
    """FD between ``n`` held-out (test) images and ``n`` train images of ``dataset``.

    The floor a perfect generator reaches at sample count ``n`` under the same
    protocol as :func:`evaluate_samples` (which subsamples the train split with
    the same ``seed``). ``n`` defaults to, and may not exceed, the size of the
    test split.
    """
    dataset = _dataset_name(dataset)  # splits are always loaded by name here
    if dataset is None:
        raise FewstepError("fd_floor needs a dataset name (or a Dataset with a name)")
    net = _resolve_net(feature_net, dataset)
    test = _real_images(dataset, "test")
    n = test.shape[0] if n is None else int(n)
    if n > test.shape[0]:
        raise FewstepError(f"fd_floor: n={n} exceeds the {test.shape[0]} held-out images of "
                           f"{_dataset_name(dataset)!r}; evaluate at n <= {test.shape[0]} to report a floor")
    if n < 2:
        raise FewstepError(f"fd_floor needs n >= 2, got {n}")
    train = _real_images(dataset, "train")
    _, train_feats = _features(net, train, (dataset, "train"))
    _, test_feats = _features(net, _subset(test, n, seed))
    return M.frechet_distance(_subset(train_feats, n, seed), test_feats)


__all__ = ["evaluate_samples", "fd_floor", "has_feature_net", "quantize_images"]
