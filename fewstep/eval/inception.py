"""Inception FID from a local weights file (DESIGN §4): the standard FID Inception, in plain PyTorch.

No package ships the Inception weights and fewstep never downloads anything, so
Inception FID is opt-in: point fewstep at a local copy of the standard FID
weights, ``pt_inception-2015-12-05-6726825d.pth`` (the TensorFlow FID Inception
ported to PyTorch, the file pytorch-fid and torchmetrics use), with

    fewstep eval RUN --inception /path/pt_inception-2015-12-05-6726825d.pth
    FEWSTEP_INCEPTION=/path/pt_inception-2015-12-05-6726825d.pth fewstep bench ...

The file is read with ``torch.load(weights_only=True)`` (no code is unpickled);
a ``.safetensors`` file holding the same state dict works too. The keys are those
of torchvision's ``Inception3(num_classes=1008, aux_logits=False)``
(``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, …,
``fc.weight``); :class:`FIDInception` below has exactly that layout, with the
FID variants of the blocks (average pools that ignore padding; max pool in the
last block's pool branch) so features match the reference implementation.

Protocol (same as the feature-net metrics, :mod:`fewstep.eval.evaluate`): samples
and real images are clamped to [-1, 1] and quantised to 8 bits, 1-channel images
are repeated to 3 channels, everything is resized to 299×299 bilinearly
(``align_corners=False``), and the 2048-D pool3 features of ``n`` samples and
``n`` real (train-split) images go through the same Fréchet code
(:func:`fewstep.eval.metrics.frechet_distance`), plus KID and precision/recall.
Keys: ``fid_inception``, ``kid_inception``, ``precision_inception``,
``recall_inception``, ``inception_weights`` (the file's name).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewstepError

ENV_VAR = "FEWSTEP_INCEPTION"
STANDARD_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
NUM_CLASSES = 1008


# ---------------------------------------------------------------------------------------- network
class BasicConv2d(nn.Module):
    """conv (no bias) → batch norm (eps 1e-3) → ReLU; keys ``conv.*`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # TensorFlow's average pool: padded zeros are not counted
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b1, b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for k in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{k}")(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for k in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{k}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool=True`` for the last block (FID Inception's pool branch uses a max pool)."""

    def __init__(self, cin: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """InceptionV3 as used for FID; ``forward(x)`` → 2048-D pool3 features.

    ``x``: images in [-1, 1], NCHW with 1 or 3 channels, any size (resized to
    299×299 bilinearly; 1 channel is repeated to 3). ``fc`` (1008 classes) is
    kept so the standard state dict loads strictly; it is not used.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.name = "inception"

    INPUT_SIZE = 299  # the standard; tests shrink it to run fast

    @classmethod
    def prepare(cls, x: torch.Tensor) -> torch.Tensor:
        """Model-space images → 3×299×299 in [-1, 1] (bilinear resize; gray repeated to RGB)."""
        x = x.float()
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise FewstepError(f"Inception features need NCHW images with 1 or 3 channels, got shape {list(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        size = (cls.INPUT_SIZE, cls.INPUT_SIZE)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    @torch.no_grad()
    def extract(self, x: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
        """Features ``[N, 2048]`` (float64 on the CPU) of model-space images, in batches."""
        self.eval()
        dev = next(self.parameters()).device
        out = [self(x[i:i + batch_size].to(dev)).double().cpu() for i in range(0, x.shape[0], batch_size)]
        return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)


# ---------------------------------------------------------------------------------------- weights
def resolve_weights_path(path: str | os.PathLike | None = None, *, required: bool = False) -> Path | None:
    """The Inception weights file: ``path`` if given, else ``$FEWSTEP_INCEPTION``, else None.

    A named file that does not exist raises :class:`FewstepError` (never a download);
    ``required=True`` also raises when neither is given.
    """
    src = "--inception"
    if not path:
        path, src = os.environ.get(ENV_VAR) or None, f"${ENV_VAR}"
    if not path:
        if required:
            raise FewstepError(f"Inception FID needs the standard weights as a local file ({STANDARD_FILE}): "
                               f"pass --inception PATH or set {ENV_VAR}=PATH; fewstep never downloads them")
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise FewstepError(
            f"Inception weights not found: {p} (from {src}). Inception FID needs the standard FID Inception "
            f"weights ({STANDARD_FILE}, the file pytorch-fid uses) as a local file: pass --inception PATH or set "
            f"{ENV_VAR}=PATH. fewstep never downloads weights; without the file, use the feature-net FD "
            "(the default) instead")
    return p


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` state dict (``torch.load(weights_only=True)``) or a ``.safetensors`` file."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise FewstepError(f"cannot read Inception weights {p}: {type(e).__name__}: {e}. Expected the state dict "
                           f"{STANDARD_FILE} (pytorch-fid) or a .safetensors file of the same keys") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise FewstepError(f"{p} is not a state dict of tensors; expected {STANDARD_FILE} (pytorch-fid)")
    return dict(sd)


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInception:
    """Build :class:`FIDInception` and load the standard FID weights from a local file (see module doc)."""
    p = resolve_weights_path(path, required=True)
    sd = read_state_dict(p)
    if any(k.startswith("AuxLogits.") for k in sd) or (
            "fc.weight" in sd and sd["fc.weight"].shape[0] != NUM_CLASSES):
        raise FewstepError(f"{p} looks like torchvision's ImageNet Inception (aux classifier or 1000 classes), "
                           f"not the FID Inception; FID needs {STANDARD_FILE} (pytorch-fid), whose features "
                           "published FIDs use")
    net = FIDInception()
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    own = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        raise FewstepError(f"{p} does not have the FID Inception layout: {len(missing)} keys missing "
                           f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    shapes = [(k, tuple(v.shape), tuple(net.state_dict()[k].shape)) for k, v in sd.items()
              if tuple(v.shape) != tuple(net.state_dict()[k].shape)]
    if shapes:
        raise FewstepError(f"{p}: tensor shapes differ from the FID Inception's, e.g. {shapes[:3]}")
    net.load_state_dict(sd, strict=False)
    net.weights_name = p.name
    return net.eval().requires_grad_(False).to(device)


_CACHE: dict = {}


def _cached_inception(path: Path, device) -> FIDInception:
    key = ("net", str(path.resolve()), path.stat().st_mtime_ns, str(device))
    if key not in _CACHE:
        _CACHE.clear()  # another file (or device): cached reference features are stale too
        _CACHE[key] = load_inception(path, device=device)
    return _CACHE[key]


def inception_metrics(samples: torch.Tensor, data, weights: str | os.PathLike | None = None, *,
                      reference: torch.Tensor | None = None, seed: int = 0, pr_k: int = 3,
                      kid_subset_size: int = 1000, batch_size: int = 50,
                      device: str | torch.device = "cpu") -> dict:
    """Inception FID (+ KID, precision/recall) of model-space image ``samples`` against real images.

    ``data``: dataset name (its train split is the reference, subsampled to the
    sample count with ``seed``, as the feature-net metrics do) unless
    ``reference`` images are given. ``weights``: the file (default ``$FEWSTEP_INCEPTION``).
    ``device``: where the Inception network runs (features are returned to the CPU in float64).
    """
    from . import metrics as M
    from .evaluate import _drop_nonfinite, _real_images, _subset, quantize_images

    path = resolve_weights_path(weights, required=True)
    net = _cached_inception(path, device)
    x, _, _ = _drop_nonfinite(samples)
    if x.ndim != 4:
        raise FewstepError(f"Inception FID is for images; got samples of shape {list(x.shape)}")
    if reference is None:
        if data is None:
            raise FewstepError("Inception FID needs the dataset (or reference images) to compare with")
        real = _real_images(data, "train")
    else:
        real = torch.as_tensor(reference).detach().cpu()
    n = min(x.shape[0], real.shape[0])
    if n <= pr_k:
        raise FewstepError(f"Inception FID needs more than {pr_k} finite samples, got {n}")
    x = x[:n]
    key = ("ref", str(path), str(data), int(real.shape[0]), n, seed, net.INPUT_SIZE) if reference is None else None
    if key is not None and key in _CACHE:
        real_f = _CACHE[key]
    else:
        real_f = net.extract(quantize_images(_subset(real, n, seed)), batch_size)
        if key is not None:
            _CACHE[key] = real_f
    fake_f = net.extract(quantize_images(x), batch_size)
    kid, _ = M.kernel_inception_distance(real_f, fake_f, subset_size=kid_subset_size, seed=seed)
    prec, rec = M.precision_recall(real_f, fake_f, k=pr_k)
    return {"fid_inception": M.frechet_distance(real_f, fake_f), "kid_inception": kid,
            "precision_inception": prec, "recall_inception": rec, "n_inception": int(n),
            "inception_weights": path.name}


__all__ = ["ENV_VAR", "FIDInception", "inception_metrics", "load_inception", "read_state_dict",
           "resolve_weights_path"]
