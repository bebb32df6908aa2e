"""Atomic safetensors + JSON checkpoints.

A *model checkpoint* is a folder holding ``model.safetensors`` (the weights a
user samples with: the EMA weights where there are any) and ``config.json``
(everything needed to rebuild the denoiser). A *training state* (optimisers,
all networks, RNG, progress) lives beside it as ``state.safetensors`` +
``state.json`` so that a killed run resumes exactly. Pickles are never loaded.
Folders are written to a temporary name and renamed into place, so a crash
never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import FewstepError


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _previous(path: Path) -> Path:
    """Where :func:`write_checkpoint_dir` keeps the folder it replaces while it swaps the new one in."""
    return path.with_name(f".{path.name}.old")


def recover_checkpoint_dir(path: Path) -> Path:
    """Put back the previous version of the folder ``path`` if a crash fell between the two renames of
    :func:`write_checkpoint_dir` (``path`` gone, its previous version still aside); returns ``path``."""
    path = Path(path).absolute()  # "." or a bare name has no parent to look beside
    old = _previous(path)
    if not path.exists() and old.is_dir():
        try:
            os.replace(old, path)
        except OSError:  # another process (a rank, a reader) put it back first
            if not path.exists():
                raise
    return path


def remove_stale_temporaries(folder: Path, pattern: str) -> None:
    """Delete the temporary folders ``.PATTERN.*`` that a killed :func:`write_checkpoint_dir` left in
    ``folder`` (each as large as a checkpoint); a previous version set aside (``.NAME.old``) is kept for
    :func:`recover_checkpoint_dir`. One process writes a run's checkpoints, so none is in use."""
    for d in Path(folder).glob(f".{pattern}.*"):  # pattern: a glob ("state-*"), or a folder name escaped
        if d.is_dir() and not d.name.endswith(".old"):
            shutil.rmtree(d, ignore_errors=True)


def write_checkpoint_dir(path: Path, files: dict[str, dict[str, torch.Tensor] | dict]) -> Path:
    """Atomically write a folder of ``*.safetensors`` (tensor dicts) and ``*.json`` files.

    ``files`` maps file names to contents: a dict of tensors for ``.safetensors``
    names, a JSON-ready dict for ``.json`` names. The files are synced to disk in a
    temporary folder, which replaces ``path`` by two renames (a folder cannot be renamed
    over a non-empty one): ``path`` → ``.NAME.old``, temporary → ``path``. A crash between
    them leaves the previous version aside, which :func:`recover_checkpoint_dir` (called by
    every reader of checkpoints and by the next write) puts back.
    """
    path = recover_checkpoint_dir(path)
    here = Path.cwd().resolve()
    if path.exists() and (path.resolve() == here or path.resolve() in here.parents):
        raise FewstepError(f"{path} is the current folder (or holds it): a checkpoint replaces its folder, so "
                           "write it to another folder")
    if path.is_dir():  # only ever replace a checkpoint: a folder holding anything else is the user's
        others = sorted(p.name for p in path.iterdir() if p.name not in files)
        if others:
            raise FewstepError(f"{path} holds other files than a checkpoint's ({', '.join(others[:5])}"
                               f"{', …' if len(others) > 5 else ''}), which replacing it would delete: "
                               "write the checkpoint to a new or empty folder")
    elif path.exists():
        raise FewstepError(f"{path} is a file: a checkpoint is a folder; give a folder path")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, glob.escape(path.name))
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                save_file(_contiguous(content), str(tmp / name))
            elif name.endswith(".json"):
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
            else:
                raise ValueError(f"unsupported checkpoint file {name}")
            _fsync(tmp / name)
        _fsync(tmp)
        old = None
        if path.exists():
            old = _previous(path)
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"checkpoint weights not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FewstepError(f"checkpoint {path} is corrupt or not a safetensors file ({e}); "
                           "re-run the command that wrote it, or resume from an earlier checkpoint") from None


def read_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"checkpoint config not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FewstepError(f"checkpoint config {path} is corrupt ({e})") from None


def load_state_dict_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Load weights, turning shape/key mismatches into a clear error."""
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise FewstepError(f"{what} does not match the network its config describes: {' '.join(first)}") from None
