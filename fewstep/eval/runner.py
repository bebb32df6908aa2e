"""Evaluate a model checkpoint: sample it, time it, measure it (DESIGN §4).

Mixture data (``8gaussians``, ``25gaussians``, ``mixture:<preset>``) gets the
exact measures; other point clouds MMD and sliced Wasserstein to held-out
points; images the feature-net metrics plus the FD floor at the same sample
count. Every result states the NFE, the sampler and the sample count.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import FewstepError

# point datasets that are samples of an exact mixture preset
MIXTURE_DATA = {"8gaussians": "ring8", "25gaussians": "grid25", "ring8": "ring8", "grid25": "grid25",
                "mix16d": "mix16d"}


def mixture_for(data: str | None):
    """The exact mixture behind a data name, or None."""
    from ..diffusion.mixture import preset

    if not data:
        return None
    name = data.split(":", 1)[1] if data.startswith("mixture:") else MIXTURE_DATA.get(data)
    return preset(name) if name else None


def measure(samples: torch.Tensor, data: str, *, labels=None, seed: int = 0,
            feature_net_required: bool = True, feature_net=None) -> dict:
    """Metrics of ``samples`` (model space) against the data named ``data``.

    Images are measured in the feature space of ``feature_net`` (a :class:`FeatureNet` or the
    path of one, e.g. trained on your own labelled images with ``python -m fewstep.eval.feature_net``),
    by default the one shipped for ``data``. Images of data that has none raise, unless
    ``feature_net_required`` is false (Inception FID is measured instead): then only the sample
    count comes back.
    """
    from .evaluate import _drop_nonfinite, evaluate_samples, fd_floor, has_feature_net
    from .feature_net import load_feature_net

    if isinstance(feature_net, (str, Path)):
        feature_net = load_feature_net(feature_net)  # once, for the metrics and the floor

    mix = mixture_for(data)
    if mix is not None:
        g = torch.Generator().manual_seed(seed + 1)
        ref = mix.sample(samples.shape[0], generator=g).float()
        return evaluate_samples(samples, mixture=mix, reference=ref, seed=seed)
    if samples.ndim == 4 and feature_net is None and not feature_net_required and not has_feature_net(data):
        x, _, nonfinite = _drop_nonfinite(samples)
        return {"kind": "images", "n": int(x.shape[0]), "nonfinite_fraction": nonfinite, "feature_net": None}
    out = evaluate_samples(samples, dataset=data, labels=labels, seed=seed, feature_net=feature_net)
    if out["kind"] != "images":
        return out
    from ..data import load_dataset

    ds = load_dataset(data, split="test")
    n_test = len(ds)
    n_floor = min(out["n"], n_test)
    name = out["feature_net"]
    if n_floor < out["n"]:  # FD at the floor's sample count too, so the two compare
        sub = evaluate_samples(samples[:n_floor], dataset=data, seed=seed, feature_net=feature_net)
        out[f"fd_{name}_at_floor_n"] = sub[f"fd_{name}"]
    out[f"fd_floor_{name}"] = fd_floor(data, n_floor, seed=seed, feature_net=feature_net)
    out["n_floor"] = n_floor
    return out


def evaluate_model(model, *, n: int = 1000, seed: int = 0, sampler: str | None = None,
                   steps: int | None = None, data: str | None = None, guidance: float | None = None,
                   batch_size: int | None = 500, inception: str | None = None,
                   schedule: str | None = None, feature_net=None) -> dict:
    """Sample ``n`` from ``model`` with the given sampler (and σ ``schedule``; default: the
    checkpoint's recipe), time it, and measure the samples.

    ``feature_net``: the feature net (or its path) for FD & co. (default: the one shipped for ``data``).
    ``inception``: path of the standard FID Inception weights; image samples then also get
    ``fid_inception`` & co. (:mod:`fewstep.eval.inception`), and data without a shipped feature
    net (your own images, ``data`` a path) is measured by those alone.
    """
    data = data or model.data_info.name
    if not data:
        raise FewstepError("this model does not name its dataset: pass --data NAME")
    kw = dict(sampler=sampler, steps=steps, schedule=schedule, guidance=guidance)
    # an untimed warm-up call first (one-time allocation and kernel selection), so that a freshly
    # loaded student and a teacher sampled for the tenth time are timed alike
    model.sample(min(n, 8), seed=seed, **kw)
    t0 = time.perf_counter()
    res = model.sample(n, seed=seed, batch_size=batch_size, **kw)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)  # a one-step student only launches kernels
    dt = time.perf_counter() - t0
    labels = None
    if model.data_info.num_classes:
        from ..model import balanced_labels

        labels = balanced_labels(n, model.data_info.num_classes)
    metrics = measure(res.x.detach().cpu().float(), data, labels=labels, seed=seed, feature_net=feature_net,
                      feature_net_required=not inception)  # with Inception FID, any image data will do
    if inception and metrics.get("kind") == "images":
        from .inception import inception_metrics

        metrics.update(inception_metrics(res.x.detach().cpu().float(), data, inception, seed=seed,
                                         device=model.device))
    recipe = model.sampling
    one_step = (sampler or recipe["sampler"]) == "one-step"
    return {"data": data, "sampler": sampler or recipe["sampler"],
            "steps": None if one_step else (steps or recipe.get("steps")),
            "schedule": None if one_step else (schedule or recipe.get("schedule", "karras")),
            "guidance": guidance if guidance is not None else 1.0,
            "nfe": res.nfe, "n_samples": n, "seed": seed, "sample_seconds": round(dt, 4),
            "samples_per_second": round(n / dt, 2), **metrics}


def evaluate_model_seeds(model, seeds, **kwargs) -> dict:
    """:func:`evaluate_model` at each noise seed in ``seeds``, and each scalar metric's mean and
    sample standard deviation over them.

    An FD at n = 1000 moves by as much between noise seeds as between two training settings, so a
    comparison (student vs teacher, method vs method) is best read on the same several seeds.
    Returns ``{"seeds", "by_seed": {seed: result}, "mean": {metric: ...}, "std": {metric: ...}}``
    plus the keys every seed shares (data, sampler, NFE, sample count); ``std`` is 0 for one seed.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise FewstepError(f"seeds must be distinct and at least one, got {seeds}")
    by_seed = {str(s): evaluate_model(model, seed=s, **kwargs) for s in seeds}
    runs = list(by_seed.values())
    keys = [k for k in headline(runs[0]) if k != "nfe" and all(k in r for r in runs)]
    vals = {k: torch.tensor([float(r[k]) for r in runs], dtype=torch.float64) for k in keys}
    shared = {k: v for k, v in runs[0].items() if k in ("data", "sampler", "steps", "nfe", "n_samples")}
    return {**shared, "seeds": seeds, "by_seed": by_seed,
            "mean": {k: float(v.mean()) for k, v in vals.items()},
            "std": {k: float(v.std()) if len(seeds) > 1 else 0.0 for k, v in vals.items()}}


def headline(metrics: dict) -> dict:
    """The scalar metrics worth a curve (drops lists and bookkeeping)."""
    skip = {"n", "n_reference", "seed", "n_samples", "steps", "n_floor", "guidance"}
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}


def make_evaluator(data: str | None, *, n: int = 1000, seed: int = 0, feature_net=None):
    """A callable ``model -> metrics`` for in-run evaluation by the training loop.

    ``feature_net``: a feature net or its path, for images of data fewstep ships none for. Images
    without one fail here, before any training, rather than at the first evaluation.
    """
    from .evaluate import has_feature_net
    from .feature_net import load_feature_net

    if isinstance(feature_net, (str, Path)):
        feature_net = load_feature_net(feature_net)
    elif feature_net is None and data and mixture_for(data) is None and not has_feature_net(data):
        from ..data import load_dataset

        if load_dataset(data, split="train").kind == "images":
            raise FewstepError(f"in-run evaluation (--eval-n) of {data!r} needs a feature net: fewstep ships none for "
                               "it; train one on labelled images with `python -m fewstep.eval.feature_net --dataset "
                               "PATH --out FILE` and pass --feature-net FILE, or drop --eval-n and use `fewstep eval "
                               "--inception` afterwards")

    def evaluator(model) -> dict:
        return headline(evaluate_model(model, n=n, seed=seed, data=data, feature_net=feature_net))
    return evaluator
