"""Headless figures: sample grids, point scatters, training curves, side-by-side comparisons.

Everything renders with matplotlib's Agg canvas on a pyplot-free ``Figure``
(no display, no global pyplot state) or with plain PIL, and writes PNG files
(parent folders are created). Images are expected in model space ([-1, 1], NCHW) and mapped to
[0, 255] with clamping.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import FewstepError


def _figure(figsize):
    """A pyplot-free Agg figure: no global state, no display, safe in threads and notebooks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _prepare(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(fig, ax, path, title: str | None) -> Path:
    """Title, tight layout and PNG output shared by the plotting functions."""
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = _prepare(path)
    fig.savefig(path, dpi=120)
    return path


def to_uint8(x) -> np.ndarray:
    """Model-space images ``[N, C, H, W]`` in [-1, 1] → uint8 ``[N, H, W, C]`` (NaN → 0)."""
    x = torch.as_tensor(x).detach().cpu().float()
    if x.ndim == 3:  # a single image
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise FewstepError(f"images must be NCHW with 1, 3 or 4 channels, got shape {list(x.shape)}")
    x = torch.nan_to_num(x, nan=-1.0).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(x, nrow: int | None = None, padding: int = 1, pad_value: int = 255) -> np.ndarray:
    """Tile model-space images into one uint8 array ``[H', W', C]`` (``nrow`` images per row)."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol_rows = math.ceil(n / nrow)
    grid = np.full((ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                   pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = imgs[i]
    return grid


def save_image_grid(x_model_space, path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Save images (model space [-1, 1], NCHW) as one PNG grid; returns the path.

    ``nrow`` images per row (default: ⌈√N⌉). Small images are enlarged by
    nearest-neighbour ``scale`` (default: so each tile is at least 32 px).
    """
    from PIL import Image

    grid = make_grid(x_model_space, nrow)
    h = torch.as_tensor(x_model_space).shape[-2]
    scale = scale or max(1, math.ceil(32 / h))
    if grid.shape[2] == 1:
        grid = grid[:, :, 0]
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = _prepare(path)
    img.save(path, format="PNG")
    return path


def save_comparison_grid(images: dict, path, nrow: int | None = None, title: str | None = None) -> Path:
    """Side-by-side sample grids, one panel per name: ``{name: model-space images}`` → PNG."""
    if not images:
        raise FewstepError("save_comparison_grid needs at least one named set of images")
    k = len(images)
    fig = _figure((3.2 * k, 3.6))
    axes = fig.subplots(1, k, squeeze=False)
    for ax, (name, x) in zip(axes[0], images.items()):
        grid = make_grid(x, nrow)
        ax.imshow(grid[:, :, 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(str(name), fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = _prepare(path)
    fig.savefig(path, dpi=120)
    return path


def _xy(points) -> np.ndarray:
    p = torch.as_tensor(points).detach().cpu().double()
    if p.ndim == 1:
        p = p[:, None]
    p = p.reshape(p.shape[0], -1)
    if p.shape[1] == 1:  # 1-D: plot on the x axis
        p = torch.cat([p, torch.zeros_like(p)], dim=1)
    return p[:, :2].numpy()


def save_scatter(points, path, reference=None, title: str | None = None, lim: float | None = None) -> Path:
    """Scatter plot of ``[N, D]`` points (first two coordinates when D > 2), optionally over a reference set."""
    p = _xy(points)
    fig = _figure((4.5, 4.5))
    ax = fig.subplots()
    if reference is not None:
        r = _xy(reference)
        ax.scatter(r[:, 0], r[:, 1], s=2, c="0.7", alpha=0.5, label="reference", rasterized=True)
    ax.scatter(p[:, 0], p[:, 1], s=2, c="tab:blue", alpha=0.6, label="samples", rasterized=True)
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal", adjustable="datalim")
    if reference is not None:
        ax.legend(loc="upper right", markerscale=4, fontsize=8)
    return _save(fig, ax, path, title)


def plot_curves(series: dict, path, xlabel: str, ylabel: str, logy: bool = False,
                title: str | None = None, logx: bool = False) -> Path:
    """Line plot of ``{name: (xs, ys)}`` (e.g. FD vs kimg per method) → PNG."""
    if not series:
        raise FewstepError("plot_curves needs at least one named (xs, ys) series")
    fig = _figure((5.5, 3.8))
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if xs.shape != ys.shape:
            raise FewstepError(f"series {name!r}: xs and ys differ in length ({xs.shape} vs {ys.shape})")
        ax.plot(xs, ys, marker="o" if len(xs) <= 20 else None, markersize=3, label=str(name))
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, ax, path, title)


__all__ = ["make_grid", "plot_curves", "save_comparison_grid", "save_image_grid", "save_scatter", "to_uint8"]
