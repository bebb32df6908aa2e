"""Knowledge distillation of the sampling chain (Luhman & Luhman 2021), DESIGN §3.

Generate (noise, teacher-ODE sample) pairs once — z ~ N(0, I), x = ODE_teacher(σ_0·z)
with a deterministic sampler — then regress a one-step student onto them:

    loss = mean ‖G(σ_0·z, σ_0) − x‖²

so that G(σ_0·z, σ_0) reproduces, in one evaluation, what the teacher's whole
sampler makes from the same noise. The student is a one-step generator in fewstep's
format (``sampling = {"sampler": "one-step", "sigma_init": σ_0}``), initialised from
the teacher.

The pairs live in the run folder (``RUN/pairs.safetensors``, or ``--pairs PATH`` to
share them between runs). They are generated in chunks, each written atomically to
``<pairs>.parts/`` with a progress bar, so a killed generation resumes where it
stopped; the finished chunks are then merged into the one file. Under ``torchrun``
the chunks are shared out between processes. Chunk k's noise comes from seed
``pairs_seed`` and k alone, so the pairs do not depend on how (or how often) the
generation was interrupted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import require
from ..errors import FewstepError
from ..model import FewstepModel, one_step_generate
from .base import DataInfo, Method, Phase, initial_network, register_method, student_data_info

ODE_SAMPLERS = ("euler", "heun", "ddim", "dpmpp-2m")


# ---------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------

def pairs_recipe(teacher: FewstepModel, sampler: str = "", steps: int = 0, schedule: str = "",
                 sigma_max: float = 0.0) -> dict:
    """The teacher's deterministic sampler for the pairs: its own recipe, overridden where given."""
    base = teacher.sampling
    if base.get("sampler") == "one-step":
        raise FewstepError("the teacher is a one-step generator; knowledge distillation needs a multi-step "
                           "teacher (a denoiser sampled with an ODE sampler)")
    if not steps and base.get("schedule") == "flow":
        raise FewstepError(f"the teacher is a rectified flow whose own recipe is {base.get('steps')} Euler step(s): "
                           "pairs of that recipe are its few-step samples, not its ODE's (KD's student, its own "
                           "network, would start at zero loss); pass --steps for an accurate solve of its ODE "
                           "(e.g. --steps 32)")
    r = {k: v for k, v in base.items()}
    if sampler:
        r["sampler"] = sampler
    if steps:
        r["steps"] = int(steps)
    if schedule:
        r["schedule"] = schedule
    if sigma_max:
        r["sigma_max"] = float(sigma_max)
    r.setdefault("steps", 18)
    r.setdefault("schedule", "karras")
    name = str(r["sampler"]).lower().replace("_", "-")
    if name not in ODE_SAMPLERS:
        raise FewstepError(f"knowledge distillation needs a deterministic ODE sampler ({', '.join(ODE_SAMPLERS)}), "
                           f"got {r['sampler']!r}")
    r["sampler"] = name
    for k in ("s_churn", "eta"):
        if r.get(k):
            raise FewstepError(f"the teacher's recipe is stochastic ({k}={r[k]}); pass --sampler/--steps "
                               "for a deterministic ODE sampler")
    return r


def _pairs_sigmas(recipe: dict, teacher: nn.Module) -> torch.Tensor:
    from ..diffusion.samplers import make_sigmas

    kw = {k: recipe[k] for k in ("sigma_min", "sigma_max", "rho") if k in recipe}
    table = getattr(teacher, "alphas_cumprod", None) if recipe["schedule"] == "vp-uniform" else None
    return make_sigmas(recipe["schedule"], int(recipe["steps"]), alphas_cumprod=table, **kw)


@torch.no_grad()
def generate_pair_chunk(teacher: nn.Module, recipe: dict, shape: tuple, num_classes: int, n: int, seed: int,
                        chunk: int, device="cpu") -> dict[str, torch.Tensor]:
    """One chunk of pairs: noise z (from ``seed`` and ``chunk`` only) and x = teacher ODE from σ_0·z."""
    from ..diffusion.samplers import get_sampler

    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(chunk))
    z = torch.randn((n,) + tuple(shape), generator=g)
    out = {"noise": z}
    labels = None
    if num_classes > 0:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        out["labels"] = labels
        labels = labels.to(device)
    sigmas = _pairs_sigmas(recipe, teacher).to(device)
    res = get_sampler(recipe["sampler"])(teacher, z.to(device) * sigmas[0], sigmas, labels)
    out["x"] = res.x.detach().float().cpu()
    return out


def _save_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"fewstep": json.dumps(metadata)} if metadata else None)
    os.replace(tmp, path)


def _read_pairs_meta(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("fewstep", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise FewstepError(f"{path} is not a pairs file written by fewstep (safetensors; {e}): delete it or "
                           "pass another --pairs path") from None


def load_pairs(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a finished pairs file: tensors ``noise``, ``x`` (and ``labels``) and its metadata."""
    from ..training.checkpoint import read_tensors

    path = Path(path)
    return read_tensors(path), _read_pairs_meta(path)


def teacher_fingerprint(teacher: FewstepModel) -> str:
    """A short hash of the teacher's network description and weights: pairs made by another teacher
    (same shapes and recipe) are not taken for this one's."""
    h = hashlib.sha256(json.dumps({k: teacher.config.get(k) for k in ("type", "net", "precond", "mixture")},
                                  sort_keys=True, default=str).encode())
    for k, v in sorted(teacher.denoiser.state_dict().items()):
        v = v.detach().cpu()
        h.update(k.encode())
        h.update((v.float() if v.is_floating_point() else v).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def generate_pairs(teacher: FewstepModel, path: str | Path, n: int, *, sampler: str = "", steps: int = 0,
                   schedule: str = "", sigma_max: float = 0.0, seed: int = 0, chunk: int = 500,
                   device=None, progress: bool | None = None) -> Path:
    """Write ``n`` (noise, teacher-ODE sample) pairs to ``path`` (safetensors), resumably.

    Chunks go to ``<path>.parts/chunk-XXXXXX.safetensors`` (each atomic) and are merged
    into ``path`` at the end; calling again after a kill generates only the missing
    chunks. A finished file with the same parameters is reused as it is; one with other
    parameters is an error. Returns ``path``.
    """
    from tqdm import tqdm

    from ..training import distributed as dist

    path = Path(path)
    device = device or teacher.device
    den = teacher.denoiser
    recipe = pairs_recipe(teacher, sampler, steps, schedule, sigma_max)
    sigma0 = float(_pairs_sigmas(recipe, den)[0])
    info = teacher.data_info
    meta = {"format": "fewstep.pairs", "version": 1, "n": int(n), "seed": int(seed), "chunk": int(chunk),
            "recipe": recipe, "sigma_init": sigma0, "sample_shape": list(info.sample_shape),
            "num_classes": int(info.num_classes), "teacher": teacher.config.get("provenance", {}).get("run") or
            teacher.config.get("type"), "teacher_hash": teacher_fingerprint(teacher)}
    keys = ("n", "seed", "chunk", "recipe", "sample_shape", "num_classes", "teacher_hash")

    def check(old: dict, where: Path) -> None:
        # files written before the teacher's fingerprint was recorded are not checked on it
        diff = [k for k in keys if old.get(k) != meta[k] and not (k == "teacher_hash" and k not in old)]
        if diff:
            raise FewstepError(f"{where} holds pairs made with other settings ({', '.join(diff)}: "
                               f"{[old.get(k) for k in diff]} vs {[meta[k] for k in diff]}); delete it or use "
                               "another --pairs path")

    if path.is_file():
        check(_read_pairs_meta(path), path)
        return path
    parts = path.with_name(path.name + ".parts")
    n_chunks = (n + chunk - 1) // chunk
    rank, world = dist.rank(), dist.world_size()
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
        mpath = parts / "meta.json"
        if mpath.is_file():
            check(json.loads(mpath.read_text()), parts)
        else:
            mpath.write_text(json.dumps(meta, indent=2) + "\n")
    dist.barrier()

    def done(k: int) -> bool:
        return (parts / f"chunk-{k:06d}.safetensors").is_file()

    mine = [k for k in range(n_chunks) if k % world == rank]
    todo = [k for k in mine if not done(k)]
    t0 = time.perf_counter()
    size = {k: min(chunk, n - k * chunk) for k in mine}
    disable = True if rank != 0 else (None if progress is None else not progress)  # None: only on a terminal
    bar = tqdm(total=sum(size.values()), initial=sum(size[k] for k in mine if k not in todo), unit="pair",
               desc="teacher pairs", disable=disable)
    for k in todo:
        out = generate_pair_chunk(den, recipe, tuple(info.sample_shape), info.num_classes, size[k], seed, k, device)
        _save_atomic(out, parts / f"chunk-{k:06d}.safetensors")
        bar.update(size[k])
    bar.close()
    dist.barrier()
    if rank == 0:
        from ..training.checkpoint import read_tensors

        chunks = [read_tensors(parts / f"chunk-{k:06d}.safetensors") for k in range(n_chunks)]
        merged = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
        meta["seconds_this_process"] = round(time.perf_counter() - t0, 3)
        _save_atomic(merged, path, meta)
        shutil.rmtree(parts, ignore_errors=True)
    dist.barrier()
    return path


# ---------------------------------------------------------------------------
# the loss and the method
# ---------------------------------------------------------------------------

def kd_loss(student: nn.Module, noise: torch.Tensor, target: torch.Tensor, sigma_init: float, labels=None, *,
            loss: str = "l2") -> torch.Tensor:
    """Per-sample regression loss of the one-step student G(σ_0·z, σ_0) onto the teacher's sample (a pure function)."""
    x = one_step_generate(student, noise, sigma_init, labels)
    d = x - target
    per = d.pow(2) if loss == "l2" else d.abs()
    return per.flatten(1).mean(1)


@dataclass
class KDConfig:
    n_pairs: int = field(default=20000, metadata={"help": "number of (noise, teacher sample) pairs generated once"})
    pairs: str = field(default="", metadata={"help": "pairs file (.safetensors) to write or reuse (default: RUN/pairs.safetensors)"})
    pairs_seed: int = field(default=0, metadata={"help": "seed of the pairs' noise"})
    chunk: int = field(default=500, metadata={"help": "pairs per atomically written chunk"})
    sampler: str = field(default="", metadata={"help": "teacher ODE sampler for the pairs (default: the teacher's own recipe, e.g. heun)"})
    steps: int = field(default=0, metadata={"help": "teacher sampler steps (0 = the teacher's recipe)"})
    schedule: str = field(default="", metadata={"help": "teacher σ schedule (default: the teacher's recipe)"})
    sigma_max: float = field(default=0.0, metadata={"help": "σ where the teacher's sampler (and so the student) starts (0 = the recipe's, 80)"})
    loss: str = field(default="l2", metadata={"help": "regression loss: l2 (Luhman & Luhman) or l1"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})

    def validate(self) -> None:
        require(self.n_pairs >= 1, f"n_pairs must be >= 1, got {self.n_pairs}")
        require(self.chunk >= 1, f"chunk must be >= 1, got {self.chunk}")
        require(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        require(self.sigma_max >= 0, f"sigma_max must be >= 0, got {self.sigma_max}")
        require(self.loss in ("l2", "l1"), f"loss must be l2 or l1, got {self.loss!r}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")


@register_method
class KnowledgeDistillation(Method):
    """Knowledge distillation (Luhman & Luhman 2021): regress a one-step student on teacher-ODE pairs.

    First generates n_pairs (noise, teacher sample) pairs with the teacher's deterministic
    sampler (resumable, saved in the run folder), then trains G(σ_0·z, σ_0) to reproduce
    each sample from its noise. The student is a one-step generator.
    """

    name = "kd"
    Config = KDConfig
    uses_data = False
    summary = "knowledge distillation: regress a one-step student on (noise, teacher-ODE sample) pairs"
    train_defaults = {"ema_halflife_kimg": 2.0}

    def __init__(self, config: KDConfig, teacher: FewstepModel, student: nn.Module, data_info: DataInfo):
        super().__init__(config)
        self.teacher_model = teacher
        self.student = student.train().requires_grad_(True)
        self.nets = {"student": self.student}
        self.frozen = {"teacher": teacher.denoiser}
        self.ema_net = "student"
        self.data_info = data_info
        self.recipe = pairs_recipe(teacher, config.sampler, config.steps, config.schedule, config.sigma_max)
        self.sigma_init = float(_pairs_sigmas(self.recipe, teacher.denoiser)[0])
        self.pairs: dict[str, torch.Tensor] | None = None

    @classmethod
    def create(cls, config, *, teacher: FewstepModel, dataset=None, init: FewstepModel | None = None):
        student = initial_network(cls.name, teacher, init)
        return cls(config, teacher, student, student_data_info(teacher, init))

    def pairs_path(self) -> Path:
        if self.config.pairs:
            return Path(self.config.pairs)
        if self.run_dir is None:
            raise FewstepError("kd needs a place for its pairs: run it in a Trainer (run folder) or set pairs=PATH")
        return Path(self.run_dir) / "pairs.safetensors"

    def ensure_pairs(self) -> dict[str, torch.Tensor]:
        """Generate (or resume, or reuse) the pairs file and load it onto the device."""
        if self.pairs is None:
            c = self.config
            path = generate_pairs(self.teacher_model, self.pairs_path(), c.n_pairs, sampler=c.sampler,
                                  steps=c.steps, schedule=c.schedule, sigma_max=c.sigma_max, seed=c.pairs_seed,
                                  chunk=c.chunk, device=self.device)
            tensors, meta = load_pairs(path)
            self.sigma_init = float(meta.get("sigma_init", self.sigma_init))
            self.pairs = {k: v.to(self.device) for k, v in tensors.items()}
        return self.pairs

    def begin_iteration(self, nimg: int, total_nimg: int) -> None:
        self.ensure_pairs()

    def build_optimizers(self):
        c = self.config
        return {"student": torch.optim.Adam(self.student.parameters(), lr=c.lr, betas=tuple(c.betas))}

    def pair_batch(self):
        """A batch of pairs drawn with replacement: (noise z, teacher sample x, labels or None)."""
        p = self.ensure_pairs()
        idx = torch.randint(0, p["x"].shape[0], (self.batch_size,), device=self.device)
        labels = p["labels"][idx] if ("labels" in p and self.data_info.num_classes > 0) else None
        return p["noise"][idx], p["x"][idx], labels

    def loss(self, batch):
        noise, x, labels = self.pair_batch()
        per = kd_loss(self.student, noise, x, self.sigma_init, labels, loss=self.config.loss)
        return per.mean(), {}

    def phases(self):
        return [Phase("student", "student", self.loss)]

    def export_config(self) -> dict:
        from ..model import network_spec

        return {"format": "fewstep.model", "version": 1, "type": "generator", **network_spec(self.student),
                "data": self.data_info.to_dict(),
                "sampling": {"sampler": "one-step", "sigma_init": self.sigma_init},
                "provenance": {"pairs": {"n": self.config.n_pairs, "recipe": self.recipe}}}


__all__ = ["ODE_SAMPLERS", "pairs_recipe", "generate_pair_chunk", "generate_pairs", "load_pairs", "kd_loss",
           "KDConfig", "KnowledgeDistillation"]
