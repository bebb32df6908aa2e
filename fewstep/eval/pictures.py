"""One call for "show these samples": a grid for images, a scatter plot for points."""
from __future__ import annotations

from pathlib import Path

import torch


def save_samples_picture(x: torch.Tensor, path: str | Path, kind: str, *, title: str | None = None,
                         reference: torch.Tensor | None = None) -> Path:
    """Write model-space samples ``x`` to a PNG: image grid (``kind="images"``) or scatter (points)."""
    from .plots import save_image_grid, save_scatter

    x = x.detach().cpu().float()
    if kind == "images":
        return save_image_grid(x, path)
    return save_scatter(x, path, reference=reference, title=title)
