"""The feature net: a small CNN classifier whose penultimate layer stands in for Inception.

FID needs Inception weights that no package ships (DESIGN §4), so fewstep trains
its own small classifier on each image dataset and measures Fréchet distance,
KID, precision/recall and class histograms in its feature space. Numbers are
reported as "FD" with the feature net named (e.g. ``fd_mnist5k-featnet``) so
they are never confused with Inception FID.

Architecture (any 1-channel square image, 8x8 and 28x28 included)::

    [conv3x3 -> BN -> ReLU] x2, maxpool 2      (widths[0] channels)
    [conv3x3 -> BN -> ReLU] x2, maxpool 2      (widths[1])
     conv3x3 -> BN -> ReLU, global average pool (widths[2])
     linear -> ReLU                              -> features  [N, feature_dim]
     dropout -> linear                           -> logits    [N, num_classes]

The shipped weights live in ``fewstep/assets/feature_nets/<dataset>.safetensors``
beside ``<dataset>.json`` (architecture, held-out accuracy, the command that
made them, seed, training time). Re-make them with::

    OMP_NUM_THREADS=2 python -m fewstep.eval.feature_net --dataset mnist5k
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import from_dict
from ..errors import FewstepError
from ..training.checkpoint import (
    atomic_write_text,
    load_state_dict_strict,
    read_json,
    read_tensors,
)

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "feature_nets"

#: Default training recipe per dataset (epochs are the only thing that differs).
DEFAULT_EPOCHS = {"digits": 40, "mnist5k": 20}


@dataclass
class FeatureNetConfig:
    """Architecture of a :class:`FeatureNet` (stored in the ``.json`` beside the weights)."""

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    widths: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 128
    dropout: float = 0.3

    def validate(self) -> None:
        if self.in_channels < 1 or self.image_size < 4 or self.num_classes < 2:
            raise FewstepError(f"invalid feature-net config {self}: need in_channels >= 1, "
                               "image_size >= 4 and num_classes >= 2")
        if len(self.widths) != 3 or min(self.widths) < 1 or self.feature_dim < 2:
            raise FewstepError(f"invalid feature-net config {self}: widths must be 3 positive ints, feature_dim >= 2")


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FeatureNet(nn.Module):
    """Small CNN classifier. ``forward(x) -> (logits, features)``; ``x`` in model space [-1, 1].

    Attributes:
        config: the :class:`FeatureNetConfig`.
        name: the name used in metric keys, e.g. ``"mnist5k-featnet"``.
        info: metadata read from the shipped ``.json`` (accuracy, command, ...); empty if untrained.
        num_features: feature dimension (torchmetrics reads this attribute).
    """

    def __init__(self, config: FeatureNetConfig | None = None, name: str = "featnet"):
        super().__init__()
        self.config = config = config or FeatureNetConfig()
        config.validate()
        w1, w2, w3 = config.widths
        self.body = nn.Sequential(
            *_conv_bn(config.in_channels, w1), *_conv_bn(w1, w1), nn.MaxPool2d(2),
            *_conv_bn(w1, w2), *_conv_bn(w2, w2), nn.MaxPool2d(2),
            *_conv_bn(w2, w3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(w3, config.feature_dim)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.name = name
        self.info: dict = {}
        self.num_features = config.feature_dim

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`FewstepError` unless ``x`` is ``[N, C, H, W]`` matching this net."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels or tuple(x.shape[2:]) != (c.image_size, c.image_size):
            raise FewstepError(
                f"feature net {self.name!r} expects images of shape [N, {c.in_channels}, {c.image_size}, "
                f"{c.image_size}], got {list(x.shape)}; use the feature net of the dataset the images come from")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        feats = F.relu(self.fc(h))
        return self.head(self.drop(feats)), feats

    @torch.no_grad()
    def extract(self, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and features of ``x`` in eval mode, in batches, on the net's device (returned on CPU)."""
        self.check_input(x)
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        logits, feats = [], []
        try:
            for i in range(0, x.shape[0], batch_size):
                lo, fe = self(x[i:i + batch_size].to(dev, torch.float32))
                logits.append(lo.cpu())
                feats.append(fe.cpu())
        finally:
            self.train(was_training)
        if not logits:
            k = self.config
            return torch.zeros(0, k.num_classes), torch.zeros(0, k.feature_dim)
        return torch.cat(logits), torch.cat(feats)


# ----------------------------------------------------------------------------- files


def asset_paths(dataset_name: str) -> tuple[Path, Path]:
    """``(weights, metadata)`` paths of the shipped feature net for ``dataset_name``."""
    return ASSET_DIR / f"{dataset_name}.safetensors", ASSET_DIR / f"{dataset_name}.json"


def make_command(dataset_name: str) -> str:
    """The shell command that (re)makes the shipped feature net of ``dataset_name``."""
    return f"OMP_NUM_THREADS=2 python -m fewstep.eval.feature_net --dataset {dataset_name}"


def _resolve(dataset_name_or_path: str | Path) -> tuple[Path, Path, str]:
    s = str(dataset_name_or_path)
    p = Path(s)
    looks_like_path = p.suffix in (".safetensors", ".json") or "/" in s or p.is_dir()
    if not looks_like_path:
        w, j = asset_paths(s)
        if not w.is_file() or not j.is_file():
            raise FewstepError(
                f"no feature net is shipped for dataset {s!r} (looked for {w} and {j.name}); "
                f"make it with: {make_command(s)}")
        return w, j, s
    if p.is_dir():
        cands = sorted(p.glob("*.safetensors"))
        if len(cands) != 1:
            raise FewstepError(f"feature-net folder {p} must hold exactly one .safetensors file, found {len(cands)}")
        p = cands[0]
    w, j = p.with_suffix(".safetensors"), p.with_suffix(".json")
    if not w.is_file() or not j.is_file():
        raise FewstepError(
            f"feature net not found: need both {w} and {j}; train one with "
            f"`python -m fewstep.eval.feature_net --dataset <name> --out {w}`")
    return w, j, p.stem


def load_feature_net(dataset_name_or_path: str | Path, device: str | torch.device = "cpu") -> FeatureNet:
    """Load a trained feature net in eval mode.

    ``dataset_name_or_path`` is a dataset name (``"mnist5k"``, ``"digits"``: the
    shipped net) or the path of a ``.safetensors`` file with its ``.json``
    beside it. Raises :class:`FewstepError` naming the command that makes the
    file when it is missing.
    """
    w, j, stem = _resolve(dataset_name_or_path)
    meta = read_json(j)
    if "config" not in meta:
        raise FewstepError(f"{j} has no 'config' entry; re-make it with {make_command(meta.get('dataset', stem))}")
    cfg = from_dict(FeatureNetConfig, meta["config"], where=f"{j.name}:config")
    net = FeatureNet(cfg, name=meta.get("name", f"{stem}-featnet"))
    load_state_dict_strict(net, read_tensors(w), f"feature-net weights {w}")
    net.info = meta
    return net.to(device).eval()


def save_feature_net(net: FeatureNet, out_path: str | Path, meta: dict) -> Path:
    """Write ``net`` to ``out_path`` (``.safetensors``) and ``meta`` + config to the ``.json`` beside it."""
    import json

    from safetensors.torch import save_file

    out_path = Path(out_path).with_suffix(".safetensors")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(out_path)
    full = {"name": net.name, "config": dataclasses.asdict(net.config), **meta}
    atomic_write_text(out_path.with_suffix(".json"), json.dumps(full, indent=2) + "\n")
    for p in (out_path, out_path.with_suffix(".json")):
        p.chmod(0o644)  # mkstemp makes 0600 files; shipped assets must be world-readable
    return out_path


# ----------------------------------------------------------------------------- training


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by an integer offset in ``[-max_shift, max_shift]`` per axis.

    Pixels shifted in are background (-1, the model-space value of black).
    """
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = (offs[:, 0, None] + torch.arange(h)[None])  # [N, H]
    cols = (offs[:, 1, None] + torch.arange(w)[None])  # [N, W]
    idx_n = torch.arange(n)[:, None, None]
    out = pad.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def accuracy(net: FeatureNet, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``net`` on ``(x, labels)``."""
    logits, _ = net.extract(x)
    return float((logits.argmax(1) == labels.cpu()).float().mean())


def _load_split(dataset_name: str, split: str):
    from ..data import load_dataset

    ds = load_dataset(dataset_name, split=split)
    if ds.kind != "images" or ds.labels is None:
        raise FewstepError(f"a feature net needs a labelled image dataset; {dataset_name!r} is {ds.kind} "
                           f"{'without' if ds.labels is None else 'with'} labels")
    return ds


def train_feature_net(dataset_name: str, *, epochs: int | None = None, seed: int = 0,
                      out_path: str | Path | None = None, batch_size: int = 64, lr: float = 2e-3,
                      max_shift: int | None = None, config: FeatureNetConfig | None = None,
                      verbose: bool = True) -> tuple[FeatureNet, dict]:
    """Train a feature net on ``dataset_name``'s train split; report accuracy on its test split.

    Recipe: AdamW (lr ``lr``, weight decay 5e-4) with a one-cycle cosine
    schedule, label smoothing 0.05, batch ``batch_size``, and random shifts of
    up to ``max_shift`` pixels (default: 2 for images >= 16 px, else 1). The
    test split is used only for the reported accuracy, never for selection.

    Writes ``out_path`` (``.safetensors`` + ``.json``) when given. Returns
    ``(net, meta)`` where ``meta`` holds ``test_accuracy``, ``train_seconds`` etc.
    """
    epochs = epochs if epochs is not None else DEFAULT_EPOCHS.get(dataset_name, 20)
    train, test = _load_split(dataset_name, "train"), _load_split(dataset_name, "test")
    x, y = train.x.float(), train.labels.long()
    c, h = x.shape[1], x.shape[2]
    cfg = config or FeatureNetConfig(in_channels=c, image_size=h, num_classes=int(train.num_classes))
    if (cfg.in_channels, cfg.image_size) != (c, h):
        raise FewstepError(f"feature-net config is for [{cfg.in_channels}, {cfg.image_size}] images, "
                           f"dataset {dataset_name!r} has {list(x.shape[1:])}")
    if max_shift is None:
        max_shift = 2 if h >= 16 else 1

    with torch.random.fork_rng(devices=[]):  # seed init and dropout without touching the caller's RNG
        torch.manual_seed(seed)
        net, meta = _fit(dataset_name, cfg, x, y, test, epochs=epochs, seed=seed, batch_size=batch_size,
                         lr=lr, max_shift=max_shift, verbose=verbose)
    cmd = make_command(dataset_name)
    if epochs != DEFAULT_EPOCHS.get(dataset_name):
        cmd += f" --epochs {epochs}"
    if seed != 0:
        cmd += f" --seed {seed}"
    if out_path is not None and Path(out_path).with_suffix(".safetensors") != asset_paths(dataset_name)[0]:
        cmd += f" --out {out_path}"
    if config is not None or (batch_size, lr) != (64, 2e-3) or max_shift != (2 if h >= 16 else 1):
        cmd = f"train_feature_net({dataset_name!r}, ...) with custom settings (see the other fields); CLI: {cmd}"
    meta["command"] = cmd
    if out_path is not None:
        save_feature_net(net, out_path, meta)
    net.info = {"name": net.name, "config": dataclasses.asdict(cfg), **meta}
    return net, meta


def _short_name(dataset_name) -> str:
    """A built-in dataset's name, or a user file's / folder's stem (``my_images/``, ``mine.npz`` → ``mine``)."""
    p = Path(str(dataset_name))
    return p.stem if (len(p.parts) > 1 or p.suffix) else str(dataset_name)


def _fit(dataset_name, cfg, x, y, test, *, epochs, seed, batch_size, lr, max_shift, verbose):
    gen = torch.Generator().manual_seed(seed)
    net = FeatureNet(cfg, name=f"{_short_name(dataset_name)}-featnet")  # metric keys: fd_<name>
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    t0, c0 = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            if idx.numel() < 2:  # BatchNorm needs two samples
                continue
            xb = random_shift(x[idx], max_shift, gen)
            logits, _ = net(xb)
            loss = F.cross_entropy(logits, y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * idx.numel()
            correct += int((logits.argmax(1) == y[idx]).sum())
            total += idx.numel()
        if verbose:
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {loss_sum / total:.4f}  "
                  f"train acc {correct / total:.4f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    net.eval()
    test_acc = accuracy(net, test.x.float(), test.labels.long())
    train_acc = accuracy(net, x, y)
    meta = {
        "dataset": dataset_name,
        "test_accuracy": round(test_acc, 5),
        "train_accuracy": round(train_acc, 5),
        "n_train": int(x.shape[0]),
        "n_test": int(test.x.shape[0]),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "max_shift": max_shift,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # times on a shared machine need this context
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
    }
    if verbose:
        print(f"{dataset_name}: held-out accuracy {test_acc:.4f} on {meta['n_test']} test images; "
              f"train accuracy {train_acc:.4f}; {seconds:.0f}s", flush=True)
    return net, meta


def main(argv: list[str] | None = None) -> int:
    """``python -m fewstep.eval.feature_net --dataset mnist5k``: (re)make the shipped feature net."""
    p = argparse.ArgumentParser(
        prog="python -m fewstep.eval.feature_net",
        description="Train the feature net of an image dataset (for FD/KID/precision/recall) on its train "
                    "split, report held-out accuracy, and write <out>.safetensors + <out>.json.")
    p.add_argument("--dataset", required=True, help="image dataset name, e.g. mnist5k or digits")
    p.add_argument("--epochs", type=int, default=None, help="default: %s" % DEFAULT_EPOCHS)
    p.add_argument("--seed", type=int, default=0, help="seeds init, batch order, shifts and dropout")
    p.add_argument("--out", default=None, help="output .safetensors (default: the shipped asset path)")
    a = p.parse_args(argv)
    out = a.out or asset_paths(a.dataset)[0]
    try:
        _, meta = train_feature_net(a.dataset, epochs=a.epochs, seed=a.seed, out_path=out)
    except FewstepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (held-out accuracy {meta['test_accuracy']:.4f}, {meta['train_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
