"""Sample-quality metrics: feature-space distances for images, exact measures for mixtures.

Feature-space metrics (inputs are ``[N, D]`` feature matrices, e.g. from
:class:`fewstep.eval.feature_net.FeatureNet`):

* :func:`frechet_distance` — ``‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^{1/2})``,
  computed by torchmetrics' ``FrechetInceptionDistance`` fed an identity
  "feature extractor" (so it never touches Inception weights), in float64.
* :func:`kernel_inception_distance` — unbiased MMD² with the cubic polynomial
  kernel ``(x·y/D + 1)³`` (torchmetrics' ``poly_mmd``), averaged over random
  subsets drawn from a seeded generator (torchmetrics' own class draws from the
  global RNG, which would make results depend on unrelated code).
* :func:`precision_recall` — Kynkäänniemi et al. (2019) k-NN manifolds.
* :func:`class_histogram`, :func:`max_uniform_deviation` — predicted-class balance.

Mixture metrics (:func:`mixture_metrics`) use the exact density of a
:class:`fewstep.diffusion.mixture.GaussianMixture` (DESIGN §2): mean
log-likelihood, mode coverage, balance, RBF-MMD and sliced Wasserstein
distance to true samples.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import FewstepError


def _as_2d(x, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        x = x.reshape(x.shape[0], -1)
    if not torch.isfinite(x).all():
        raise FewstepError(f"{what} contains NaN or Inf values; drop non-finite samples first")
    return x.detach().to("cpu", torch.float64)


# ----------------------------------------------------------------------------- feature space


class _Identity(nn.Module):
    """Pass-through "feature extractor" for torchmetrics metrics fed precomputed features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N_a, D]``, ``[N_b, D]``.

    Uses ``torchmetrics.image.fid.FrechetInceptionDistance`` with an identity
    feature module (no Inception), in float64. Needs at least 2 rows per set;
    with fewer rows than dimensions the covariances are singular, which the
    formula tolerates but which biases the value upwards (compare at equal N).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _as_2d(feats_a, "feats_a"), _as_2d(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise FewstepError(f"feature sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise FewstepError(f"Fréchet distance needs >= 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    # sync_on_compute=False: the features are complete here; under torchrun only rank 0 evaluates,
    # and torchmetrics' default cross-rank gather would wait for the other ranks forever
    metric = FrechetInceptionDistance(feature=_Identity(a.shape[1]), normalize=True, sync_on_compute=False)
    metric.update(a, real=True)
    metric.update(b, real=False)
    return max(float(metric.compute()), 0.0)


def kernel_inception_distance(feats_a, feats_b, *, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef: float = 1.0,
                              seed: int = 0) -> tuple[float, float]:
    """KID: unbiased polynomial-kernel MMD² between feature sets; returns ``(mean, std)`` over subsets.

    ``subset_size`` is capped at the smaller set size. Kernel
    ``k(x, y) = (gamma·x·y + coef)^degree`` with ``gamma = 1/D`` by default
    (Bińkowski et al. 2018; torchmetrics' ``poly_mmd``). Subsets are drawn with
    a generator seeded by ``seed``.
    """
    from torchmetrics.image.kid import poly_mmd

    a, b = _as_2d(feats_a, "feats_a"), _as_2d(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise FewstepError(f"feature sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise FewstepError(f"KID needs >= 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        ia = torch.randperm(a.shape[0], generator=g)[:m]
        ib = torch.randperm(b.shape[0], generator=g)[:m]
        vals.append(poly_mmd(a[ia], b[ib], degree=degree, gamma=gamma, coef=coef))
    v = torch.stack(vals)
    return float(v.mean()), float(v.std(unbiased=False))


def _kth_nn_radius(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    out = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i:i + chunk], x)
        # index 0 of the sorted row is the point itself (distance 0)
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _inside_fraction(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    inside = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i:i + chunk], centres)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) in feature space.

    Each set's manifold is the union of balls around its points with radius the
    distance to the point's k-th nearest neighbour within the same set.
    Precision = fraction of fake points inside the real manifold (quality);
    recall = fraction of real points inside the fake manifold (coverage).
    Compare at equal set sizes: both depend on N through the radii.
    """
    r, f = _as_2d(real_feats, "real_feats"), _as_2d(fake_feats, "fake_feats")
    if r.shape[1] != f.shape[1]:
        raise FewstepError(f"feature sets differ in dimension: {r.shape[1]} vs {f.shape[1]}")
    if min(r.shape[0], f.shape[0]) <= k:
        raise FewstepError(f"precision/recall with k={k} needs more than {k} samples per set, "
                           f"got {r.shape[0]} real and {f.shape[0]} fake")
    r_rad, f_rad = _kth_nn_radius(r, k), _kth_nn_radius(f, k)
    return _inside_fraction(f, r, r_rad), _inside_fraction(r, f, f_rad)


def class_histogram(logits, num_classes: int | None = None) -> torch.Tensor:
    """Fraction of samples assigned (argmax) to each class; ``[K]`` float64 summing to 1."""
    logits = torch.as_tensor(logits)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise FewstepError(f"class_histogram expects non-empty logits of shape [N, K], got {list(logits.shape)}")
    k = num_classes or logits.shape[1]
    counts = torch.bincount(logits.argmax(1).cpu(), minlength=k).double()
    return counts / counts.sum()


def max_uniform_deviation(hist) -> float:
    """``max_k |h_k − 1/K| / (1/K)``: 0 for a perfectly balanced histogram, K−1 if all mass is in one class."""
    h = torch.as_tensor(hist, dtype=torch.float64)
    u = 1.0 / h.numel()
    return float(((h - u).abs() / u).max())


# ----------------------------------------------------------------------------- mixtures


def rbf_mmd2(x, y, bandwidth: float | None = None, median_points: int = 1000) -> tuple[float, float]:
    """Unbiased MMD² with a Gaussian kernel ``exp(−‖a−b‖² / (2 h²))``; returns ``(mmd2, h)``.

    Median heuristic: when ``bandwidth`` is None, ``h² = median/2`` of the
    squared pairwise distances between distinct points of the pooled set
    ``x ∪ y`` (estimated on a fixed random subset of ``median_points`` pooled
    points when larger), so that ``k = exp(−d²/median(d²))`` and a typical pair
    has kernel value 1/e.
    The unbiased estimator can be slightly negative when the sets match.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise FewstepError(f"MMD needs >= 2 samples per set, got {n} and {m}")
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).square()
    if bandwidth is None:
        zs = z
        if z.shape[0] > median_points:  # the median of ~500k pairs is plenty, and 30x cheaper
            zs = z[torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(0))[:median_points]]
        med = float(torch.nn.functional.pdist(zs).square().median())
        h2 = max(med, 1e-12) / 2
    else:
        h2 = float(bandwidth) ** 2
    k = torch.exp(-d2 / (2 * h2))
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    mmd2 = ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean())
    return float(mmd2), math.sqrt(h2)


def sliced_wasserstein(x, y, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance ``sqrt(E_θ W₂²(θ·x, θ·y))`` over random unit directions θ.

    1-D W₂ between the projected sets is computed from their quantile
    functions (exact sorting when sizes match, linear interpolation of the
    empirical quantiles otherwise). Directions come from a generator seeded by
    ``seed``.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise FewstepError(f"point sets differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], n_projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
    if px.shape[0] != py.shape[0]:
        q = max(px.shape[0], py.shape[0])
        levels = (torch.arange(q, dtype=torch.float64) + 0.5) / q
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return float((px - py).square().mean(dim=0).mean().sqrt())


def _quantiles(sorted_vals: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of sorted columns ``[n, P]`` at probability ``levels``."""
    n = sorted_vals.shape[0]
    pos = (levels * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo)[:, None]
    return sorted_vals[lo] * (1 - w) + sorted_vals[hi] * w


def mixture_metrics(samples, mixture, reference=None, *, coverage_threshold: float = 0.1,
                    max_kernel_samples: int = 2000, n_projections: int = 256, seed: int = 0) -> dict:
    """Exact measures of ``samples`` ``[N, D]`` against a Gaussian-mixture ``mixture``.

    Returns a flat dict:

    * ``log_likelihood``: mean ``log p(x)`` of the finite samples under the true density;
      ``ref_log_likelihood``: the same for the reference (true) samples — the value a
      perfect sampler reaches up to noise (−entropy).
    * ``component_hist``: soft component histogram ``h_k = mean_i r_k(x_i)`` (responsibilities
      under the true mixture). For true samples ``E[h_k] = π_k`` exactly, even when
      components overlap (a hard argmax assignment would be biased there).
    * ``mode_coverage``: fraction of components k with ``N·h_k ≥ coverage_threshold·N·π_k``
      and ``N·h_k ≥ 0.5`` — i.e. a mode is covered when it receives at least 10 % (default)
      of its expected share of samples, and at least half a sample's worth of mass.
    * ``balance_tv``: total-variation distance ``½ Σ_k |h_k − π_k|`` (0 = perfect balance,
      → 1 − π_k when everything lands in one mode k). True samples give ≈ O(√(K/N)).
    * ``mmd_rbf``: unbiased RBF-kernel MMD² to the reference, median-heuristic bandwidth
      (see :func:`rbf_mmd2`), on at most ``max_kernel_samples`` points per set.
    * ``mmd_bandwidth``, ``sliced_wasserstein`` (:func:`sliced_wasserstein`, ``n_projections``).
    * ``n``, ``n_reference``, ``nonfinite_fraction`` (non-finite samples are dropped first).

    ``reference`` defaults to ``len(samples)`` fresh samples from ``mixture``
    drawn with a generator seeded by ``seed`` (equal sample counts).
    """
    x = torch.as_tensor(samples).detach().cpu()
    if x.ndim == 1:
        x = x[:, None]
    x = x.reshape(x.shape[0], -1)
    n_total = x.shape[0]
    finite = torch.isfinite(x).all(dim=1)
    x = x[finite]
    if x.shape[0] < 2:
        raise FewstepError(f"mixture_metrics needs >= 2 finite samples, got {x.shape[0]} of {n_total}")
    weights = torch.as_tensor(mixture.weights).detach().cpu().double()
    g = torch.Generator().manual_seed(seed)
    if reference is None:
        reference = mixture.sample(x.shape[0], generator=g)
    ref = torch.as_tensor(reference).detach().cpu().reshape(len(reference), -1)
    if ref.shape[1] != x.shape[1]:
        raise FewstepError(f"samples have dimension {x.shape[1]} but the reference/mixture has {ref.shape[1]}")
    w_raw = torch.as_tensor(mixture.weights)
    model_dtype = w_raw.dtype if torch.is_floating_point(w_raw) else torch.float32
    xs, rs = x.to(model_dtype), ref.to(model_dtype)

    with torch.no_grad():
        ll = mixture.log_prob(xs).double()
        ll_ref = mixture.log_prob(rs).double()
        resp = mixture.responsibilities(xs).double()
    n = x.shape[0]
    hist = resp.mean(dim=0)
    covered = (hist >= coverage_threshold * weights) & (hist * n >= 0.5)

    def sub(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] <= max_kernel_samples:
            return t
        return t[torch.randperm(t.shape[0], generator=g)[:max_kernel_samples]]

    mmd2, bw = rbf_mmd2(sub(x.double()), sub(ref.double()))
    return {
        "n": int(n),
        "n_reference": int(ref.shape[0]),
        "nonfinite_fraction": float(1 - finite.double().mean()),
        "log_likelihood": float(ll.mean()),
        "ref_log_likelihood": float(ll_ref.mean()),
        "mode_coverage": float(covered.double().mean()),
        "balance_tv": float(0.5 * (hist - weights).abs().sum()),
        "component_hist": [round(float(v), 6) for v in hist],
        "mmd_rbf": mmd2,
        "mmd_bandwidth": bw,
        "sliced_wasserstein": sliced_wasserstein(x, ref, n_projections=n_projections, seed=seed),
    }
