"""Which metric heads a table or a curve, and how metrics are laid out in tables.

Shared by the training loop's progress bar, ``fewstep bench``, ``fewstep report``
and the README results generator, so every place names and orders metrics the
same way: images lead with the feature-net FD (lower is better), exact mixtures
with the log-likelihood under the true density (higher is better), other point
sets with the sliced Wasserstein distance (lower is better). Diversity always
sits beside quality (precision/recall and the class histogram's deviation for
images, mode coverage and balance for mixtures) so that a mode-collapsed
student cannot look good on one number.
"""
from __future__ import annotations

import math


def _fd_key(metrics: dict) -> str | None:
    for k in metrics:
        if k == "fd" or (k.startswith("fd_") and not k.startswith("fd_floor") and not k.endswith("_at_floor_n")):
            return k
    return None


def metric_kind(metrics: dict) -> str:
    """"images", "mixture" or "points" (from ``kind`` or, for headline dicts, from the keys)."""
    if metrics.get("kind") in ("images", "mixture", "points"):
        return metrics["kind"]
    if _fd_key(metrics) or "fid_inception" in metrics:
        return "images"
    if "log_likelihood" in metrics:
        return "mixture"
    return "points"


def primary_metric(metrics: dict) -> tuple[str, float, bool] | None:
    """``(key, value, higher_is_better)`` of the headline metric, or None when there is none."""
    if not metrics:
        return None
    k = _fd_key(metrics)
    if k is not None:
        return k, metrics[k], False
    for key, higher in (("fid_inception", False), ("log_likelihood", True), ("sliced_wasserstein", False), ("mmd_rbf", False)):
        if isinstance(metrics.get(key), (int, float)):
            return key, metrics[key], higher
    return None


def metric_label(key: str) -> str:
    """A short human label: ``fd_mnist5k-featnet`` → ``FD (mnist5k-featnet)``."""
    names = {"log_likelihood": "log-likelihood", "sliced_wasserstein": "sliced W2", "mmd_rbf": "MMD²",
             "mode_coverage": "mode coverage", "balance_tv": "balance TV", "fid_inception": "FID (Inception)",
             "fd": "FD", "fd_floor": "FD floor"}
    if key in names:
        return names[key]
    for prefix, label in (("fd_floor_", "FD floor"), ("fd_", "FD"), ("kid_", "KID"), ("precision_", "precision"),
                          ("recall_", "recall"), ("class_max_dev_", "class imbalance")):
        if key.startswith(prefix):
            return f"{label} ({key[len(prefix):]})"
    return key


def columns(metrics: dict) -> list[tuple[str, str]]:
    """``[(header, key)]`` of the quality and diversity columns for metrics of this kind."""
    kind = metric_kind(metrics)
    if kind == "images":
        inception = [("FID (Inception)", "fid_inception"), ("KID (Inception)", "kid_inception"),
                     ("precision (Inception)", "precision_inception"), ("recall (Inception)", "recall_inception")]
        k = _fd_key(metrics)
        if k is None:  # images fewstep has no feature net for: Inception alone
            return inception if "fid_inception" in metrics else []
        net = k[3:]
        cols = [(f"FD ({net})", k)]
        n_floor = metrics.get("n_floor")
        if f"{k}_at_floor_n" in metrics:  # the floor has fewer real images than n: FD at its n beside it
            cols.append((f"FD at n = {n_floor}", f"{k}_at_floor_n"))
        cols += [(f"FD floor (n = {n_floor})" if n_floor else "FD floor", f"fd_floor_{net}"), ("KID", f"kid_{net}"),
                 ("precision", f"precision_{net}"), ("recall", f"recall_{net}"),
                 ("class imbalance", f"class_max_dev_{net}")]
        return cols + inception[:1] if "fid_inception" in metrics else cols
    if kind == "mixture":
        return [("log-lik", "log_likelihood"), ("true log-lik", "ref_log_likelihood"),
                ("sliced W2", "sliced_wasserstein"), ("MMD²", "mmd_rbf"), ("precision", "precision"),
                ("recall", "recall"), ("mode coverage", "mode_coverage"), ("balance TV", "balance_tv")]
    return [("sliced W2", "sliced_wasserstein"), ("MMD²", "mmd_rbf"), ("precision", "precision"), ("recall", "recall")]


def fmt(v, digits: int = 4) -> str:
    """A table cell: numbers to ``digits`` significant figures, None/NaN as an empty cell."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if 10 ** digits <= abs(v) < 1e9:
            return f"{v:.0f}"
        if v != 0 and (abs(v) >= 10 ** digits or abs(v) < 10 ** -(digits - 1)):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table (cells formatted with :func:`fmt`; ``|`` escaped)."""
    def cell(v):
        return fmt(v).replace("|", "\\|")

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


__all__ = ["columns", "fmt", "markdown_table", "metric_kind", "metric_label", "primary_metric"]
