"""The one training loop shared by teacher training and every distillation method.

Per iteration: ``method.begin_iteration`` → each declared :class:`Phase` (zero grad,
loss, backward, gradient all-reduce across ranks, non-finite gradients cleaned,
clipping, optimiser step) → ``method.end_iteration`` → EMA of the student.
Progress is counted in images seen (kimg), as EDM and SiD do. The loop writes
the run folder (:mod:`fewstep.training.run_dir`): stats, sample pictures over
time, periodic evaluations, resumable training states and the exported model.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..config import require, to_dict
from ..errors import FewstepError
from ..methods.base import Method
from . import distributed as dist
from .checkpoint import (load_state_dict_strict, read_json, read_tensors, recover_checkpoint_dir, remove_stale_temporaries,
                         write_checkpoint_dir)
from .ema import EMA, ema_beta
from .run_dir import RunDir


PRECISIONS = ("fp32", "bf16")  # --precision: fp32, or bf16 autocast (see :func:`autocast`)


@dataclass
class TrainConfig:
    """Options of the shared loop (method-specific ones live in each method's config)."""

    total_kimg: float = field(default=100.0, metadata={"help": "training length in thousands of images seen"})
    batch_size: int = field(default=64, metadata={"help": "images per iteration and process"})
    seed: int = field(default=0, metadata={"help": "seed of networks, noise and data order"})
    ema_halflife_kimg: float = field(default=10.0, metadata={"help": "EMA half-life of the student in kimg (0 = no EMA)"})
    ema_rampup: float | None = field(default=0.05, metadata={"help": "cap the EMA half-life at this fraction of images seen (EDM); null = off"})
    grad_clip: float | None = field(default=None, metadata={"help": "clip each optimiser's gradient norm to this"})
    log_every_kimg: float = field(default=1.0, metadata={"help": "write stats every this many kimg"})
    snapshot_every_kimg: float = field(default=10.0, metadata={"help": "sample picture + exported model every this many kimg"})
    checkpoint_every_kimg: float = field(default=10.0, metadata={"help": "resumable training state every this many kimg"})
    eval_every_kimg: float = field(default=0.0, metadata={"help": "in-run evaluation every this many kimg (0 = only at the end)"})
    eval_max_share: float | None = field(default=None, metadata={"help": "skip an in-run evaluation (logged) when it would raise evaluation to more than this share of the time, e.g. 0.1; null = never skip"})
    keep_checkpoints: int = field(default=2, metadata={"help": "training states kept on disk"})
    max_minutes: float | None = field(default=None, metadata={"help": "stop after this wall-clock budget (minutes)"})
    max_nonfinite: int = field(default=20, metadata={"help": "abort after this many consecutive non-finite losses"})
    snapshot_samples: int = field(default=64, metadata={"help": "samples in each snapshot picture"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    precision: str = field(default="fp32", metadata={"choices": PRECISIONS, "help": "fp32, or bf16: each loss runs under torch.autocast in bfloat16 (matmuls and convolutions; weights, gradients, optimiser states, EMA and the loss arithmetic stay fp32). Faster on CPUs with AVX512-BF16 or AMX and on recent GPUs; the fake-score methods read small differences of two networks' outputs, which bf16 rounds, and may learn less per image; so does consistency distillation, most with its pseudo-Huber distance (it warns)"})
    tensorboard: bool = field(default=False, metadata={"help": "also write TensorBoard event files"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> None:
        require(self.total_kimg > 0, f"total_kimg must be > 0, got {self.total_kimg}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(0 <= self.seed < 2**31, f"seed must be in [0, 2^31), got {self.seed}")
        require(self.snapshot_samples >= 1, f"snapshot_samples must be >= 1 (samples in each snapshot picture), "
                                            f"got {self.snapshot_samples}")
        require(self.ema_halflife_kimg >= 0, f"ema_halflife_kimg must be >= 0, got {self.ema_halflife_kimg}")
        require(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
        for k in ("log_every_kimg", "snapshot_every_kimg", "checkpoint_every_kimg"):  # counted in whole images
            require(getattr(self, k) >= 0.001, f"{k} must be at least 0.001 (one image), got {getattr(self, k)}")
        require(self.eval_every_kimg == 0 or self.eval_every_kimg >= 0.001,
                f"eval_every_kimg must be 0 (only at the end) or at least 0.001 (one image), got {self.eval_every_kimg}")
        require(self.eval_max_share is None or 0 < self.eval_max_share <= 1,
                f"eval_max_share must be in (0, 1], got {self.eval_max_share}")
        require(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        require(self.max_minutes is None or self.max_minutes > 0, "max_minutes must be > 0")
        require(self.precision in PRECISIONS,
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def autocast(device: torch.device, precision: str):
    """The context a phase's loss runs in: ``torch.autocast`` to bfloat16 for ``bf16``, else nothing.

    Backward runs outside it (as PyTorch recommends); parameters and their gradients stay fp32.
    """
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


Evaluator = Callable[["object"], dict]  # FewstepModel -> metrics


# ---- interruption and network modes ---------------------------------------------------------------
class _CtrlC:
    """Ctrl-C during training: the first press ends the loop after the current iteration (the
    training state is then saved, so nothing is lost); a second press interrupts at once. Only in
    the main thread, and only where Python's own SIGINT handler is installed (a caller's is kept)."""

    def __init__(self, speak: bool = True):
        self.pressed = False
        self.speak = speak  # under torchrun every rank gets the signal: one of them says so
        self.armed = (threading.current_thread() is threading.main_thread()
                      and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if self.armed:
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        if self.speak:
            print("\nfewstep: interrupted: saving the training state after this iteration (Ctrl-C again to stop "
                  "at once)", file=sys.stderr, flush=True)

    def disarm(self) -> None:
        if self.armed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.armed = False


@contextlib.contextmanager
def kept_modes(net: nn.Module):
    """Restore every submodule's train/eval flag after the block: a snapshot or an evaluation of
    the live network (no EMA) samples it in eval mode, and training must go on in train mode."""
    modes = [(m, m.training) for m in net.modules()]
    try:
        yield net
    finally:
        for m, training in modes:
            m.training = training


# ---- optimiser state <-> safetensors ------------------------------------------------------------
def _flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for idx, st in sd["state"].items():
        state_meta[str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{idx}.{k}"] = v
            else:
                state_meta[str(idx)][k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": state_meta}


def _unflatten_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            idx, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Trainer:
    """Runs a :class:`Method` to completion, resumably, in a run folder."""

    def __init__(self, method: Method, config: TrainConfig, run_dir: str, *, dataset=None,
                 evaluator: Evaluator | None = None, run_config: dict | None = None):
        self.method = method
        self.cfg = config
        self.device = dist.process_device(config.device)
        self.rank, self.world = dist.init_from_env(self.device)
        self.run = RunDir(run_dir, main_process=self.rank == 0)
        self.dataset = dataset
        self.evaluator = evaluator
        self.run_config = run_config or {}
        if method.uses_data and dataset is None:
            raise FewstepError(f"method {method.name!r} trains on data: give a dataset")
        self.nimg = 0
        self.iteration = 0
        self.elapsed = 0.0  # seconds of training (excluding evaluation), across resumes
        self.eval_seconds = 0.0
        self.nonfinite_total = 0
        self.nonfinite_grads = 0
        self._nonfinite_streak = 0
        self._pause = 0.0  # seconds of this process spent on evaluation/snapshots (not training)
        self._last_eval_dt: float | None = None  # duration of this process's latest evaluation
        self.evals_skipped = 0

    # ---- set-up -------------------------------------------------------------------------
    def _setup(self) -> None:
        m = self.method
        m.to(self.device)
        m.batch_size = self.cfg.batch_size
        m.run_dir = self.run.root  # methods may write artefacts of their own there (e.g. stage students)
        m.log = self.run.log
        m.check_training(self.cfg, self.world)
        for net in m.nets.values():
            dist.broadcast_module(net)
        for net in m.frozen.values():
            net.eval().requires_grad_(False)
        m.optimizers = m.build_optimizers()
        self.ema = EMA(m.nets[m.ema_net]) if (m.ema_net and self.cfg.ema_halflife_kimg > 0) else None
        self.data_gen = torch.Generator()
        self._seed_streams()

    def _seed_streams(self, offset: int = 0) -> None:
        """Per-rank streams: global torch RNG (noise inside losses) and the data order."""
        torch.manual_seed(self.cfg.seed * 7919 + self.rank + offset)
        self.data_gen.manual_seed(self.cfg.seed * 104729 + 17 + self.rank + offset)

    def _device_rng_state(self) -> torch.Tensor | None:
        """The CUDA generator's state of this process's GPU (None on CPU)."""
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def _student_net(self):
        m = self.method
        if m.ema_net is None:
            return None
        return self.ema.ema if self.ema is not None else m.nets[m.ema_net]

    # ---- checkpoints --------------------------------------------------------------------
    def _state_name(self) -> str:
        return f"state-{self.iteration:08d}"

    def save_state(self) -> None:
        if dist.rank0_decides((self.run.checkpoints / self._state_name() / "state.json").is_file()):
            return  # this iteration's state is on disk already (a stop right after a periodic checkpoint)
        # every rank's RNG streams (noise and data order; on a GPU the device's too: the losses draw
        # their noise there) go into rank 0's checkpoint
        rngs = dist.gather_to_rank0((torch.get_rng_state(), self.data_gen.get_state(), self._device_rng_state()))
        if self.rank != 0:
            dist.barrier()
            return
        m = self.method
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {"iteration": self.iteration, "nimg": self.nimg, "elapsed": self.elapsed,
                      "eval_seconds": self.eval_seconds, "nonfinite_total": self.nonfinite_total,
                      "nonfinite_grads": self.nonfinite_grads, "optimizers": {}, "world_size": self.world,
                      "batch_size": self.cfg.batch_size, "seed": self.cfg.seed}
        for name, net in m.nets.items():
            tensors.update({f"net.{name}.{k}": v for k, v in net.state_dict().items()})
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.ema.state_dict().items()})
        for name, opt in m.optimizers.items():
            t, om = _flatten_optimizer(opt, f"opt.{name}")
            tensors.update(t)
            meta["optimizers"][name] = om
        for r, (t_rng, d_rng, c_rng) in enumerate(rngs):
            suffix = "" if r == 0 else f".rank{r}"
            tensors[f"rng.torch{suffix}"], tensors[f"rng.data{suffix}"] = t_rng, d_rng
            if c_rng is not None:
                tensors[f"rng.cuda{suffix}"] = c_rng
        et, em = m.extra_state()
        tensors.update({f"extra.{k}": v for k, v in et.items()})
        meta["extra"] = em
        write_checkpoint_dir(self.run.checkpoints / self._state_name(),
                             {"state.safetensors": tensors, "state.json": meta})
        states = sorted(self.run.checkpoints.glob("state-*"))
        import shutil

        for old in states[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def _finished_summary(self) -> dict | None:
        """The summary of a run that already reached total_kimg (the same command run again), else None."""
        path = self.run.root / "summary.json"
        total = int(round(self.cfg.total_kimg * 1000))
        old = None
        if self.nimg >= total and path.is_file():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = None
        finished = old is not None and old.get("stop_reason") == "done" and old.get("nimg") == self.nimg
        if not dist.rank0_decides(finished):
            return None
        if self.rank == 0:
            return old
        return {"method": self.method.name, "stop_reason": "done", "nimg": self.nimg, "kimg": self.nimg / 1000,
                "iterations": self.iteration, "train_seconds": round(self.elapsed, 3), "final_metrics": None}

    def latest_state(self):
        for aside in self.run.checkpoints.glob(".state-*.old"):  # a run killed while it replaced a state
            recover_checkpoint_dir(aside.with_name(aside.name[1:-len(".old")]))
        if self.run.main:  # and the half-written ones of a run killed while it wrote a state
            remove_stale_temporaries(self.run.checkpoints, "state-*")
        states = sorted(p for p in self.run.checkpoints.glob("state-*")
                        if (p / "state.json").is_file() and (p / "state.safetensors").is_file())
        return states[-1] if states else None

    def load_state(self, path) -> None:
        m = self.method
        meta = read_json(path / "state.json")
        tensors = read_tensors(path / "state.safetensors")
        if meta.get("world_size", 1) != self.world:
            self.run.log(f"note: resuming a {meta.get('world_size')}-process run with {self.world} processes", echo=True)
        if meta.get("batch_size", self.cfg.batch_size) != self.cfg.batch_size:
            self.run.log(f"note: the run so far used --batch-size {meta['batch_size']}, this resume uses "
                         f"{self.cfg.batch_size}: it goes on, but no longer as the uninterrupted run would", echo=True)
        if meta.get("seed", self.cfg.seed) != self.cfg.seed:
            self.run.log(f"note: --seed {self.cfg.seed} is ignored on resume: the run's random streams (seed "
                         f"{meta['seed']}) come back from the training state", echo=True)
        for name, net in m.nets.items():
            p = f"net.{name}."
            load_state_dict_strict(net, {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)},
                                   f"{path.name} (the run's saved {name!r} network: was the run started with "
                                   "another --init or network? then use another --out)")
        if self.ema is not None:
            self.ema.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        m.load_extra_state({k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}, meta.get("extra", {}))
        m.optimizers = m.build_optimizers()  # the method may have changed networks (stages)
        for name, opt in m.optimizers.items():
            _unflatten_optimizer(opt, f"opt.{name}", tensors, meta["optimizers"][name])
        suffix = "" if self.rank == 0 else f".rank{self.rank}"
        if f"rng.torch{suffix}" in tensors:
            torch.set_rng_state(tensors[f"rng.torch{suffix}"])
            self.data_gen.set_state(tensors[f"rng.data{suffix}"])
            if self.device.type == "cuda" and f"rng.cuda{suffix}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"], self.device)
        else:  # a rank the checkpoint did not have: fresh streams, distinct per rank and iteration
            self._seed_streams(offset=1_000_003 * meta["iteration"])
        self.iteration, self.nimg = meta["iteration"], meta["nimg"]
        self.elapsed, self.eval_seconds = meta["elapsed"], meta.get("eval_seconds", 0.0)
        self.nonfinite_total = meta.get("nonfinite_total", 0)
        self.nonfinite_grads = meta.get("nonfinite_grads", 0)
        for name in ("stats.jsonl", "metrics.jsonl"):
            self.run.truncate_jsonl(name, self.nimg)

    # ---- pieces of an iteration ---------------------------------------------------------
    def _batch(self):
        if not self.method.uses_data:
            return None
        ds = self.dataset
        idx = torch.randint(0, len(ds), (self.cfg.batch_size,), generator=self.data_gen)
        x = ds.x[idx].to(self.device)
        labels = ds.labels[idx].to(self.device) if getattr(ds, "labels", None) is not None else None
        return x, labels

    def _run_phase(self, phase, batch, stats: dict) -> None:
        opt = self.method.optimizers[phase.optimizer]
        params = [p for g in opt.param_groups for p in g["params"]]
        for _ in range(phase.repeats):
            opt.zero_grad(set_to_none=True)
            with autocast(self.device, self.cfg.precision):
                loss, pstats = phase.loss(batch)
            if dist.any_rank(not torch.isfinite(loss)):  # every rank skips together
                self.nonfinite_total += 1
                self._nonfinite_streak += 1
                where = f" ({loss.item()})" if not torch.isfinite(loss) else " on another rank"
                self.run.log(f"iteration {self.iteration}: non-finite {phase.name} loss{where}; step skipped", echo=True)
                if self._nonfinite_streak >= self.cfg.max_nonfinite:
                    raise FewstepError(
                        f"{self._nonfinite_streak} consecutive non-finite losses in phase {phase.name!r}; "
                        "stopping. Lower the learning rate, or resume from an earlier checkpoint in "
                        f"{self.run.checkpoints}")
                continue
            self._nonfinite_streak = 0
            loss.backward()
            dist.average_gradients(params)
            bad = 0
            for p in params:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    bad += 1
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            if bad:
                self.nonfinite_grads += 1
            if phase.grad_clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, phase.grad_clip_value)
            if self.cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            opt.step()
            stats.setdefault(f"loss/{phase.name}", []).append(float(loss.detach()))
            for k, v in pstats.items():
                stats.setdefault(k, []).append(float(v))

    def _snapshot(self, final: bool = False) -> None:
        net = self._student_net()
        if net is None or self.rank != 0:
            return
        with kept_modes(net):
            self._write_snapshot(net, final)

    def _write_snapshot(self, net, final: bool) -> None:
        model = self.method.student_model(net)  # puts net in eval mode: kept_modes restores it
        cfg = dict(model.config)
        cfg["provenance"] = {**cfg.get("provenance", {}), "method": self.method.name,
                             "kimg": round(self.nimg / 1000, 3), "iteration": self.iteration,
                             "run": str(self.run.root)}
        model.config = cfg
        model.save(self.run.model_dir)
        try:
            from ..eval.pictures import save_samples_picture
        except ImportError:  # pragma: no cover
            return
        res = model.sample(self.cfg.snapshot_samples, seed=0)
        name = "final.png" if final else f"samples-{self.nimg / 1000:011.3f}kimg.png"  # snapshots < 1 kimg apart
        save_samples_picture(res.x, self.run.root / "samples" / name, model.data_info.kind,
                             title=f"{self.method.name} · {self.nimg / 1000:.1f} kimg · NFE {res.nfe}")

    def _evaluate(self) -> dict | None:
        if self.evaluator is None or self.rank != 0:
            return None
        t0 = time.perf_counter()
        net = self._student_net()
        with kept_modes(net):  # without an EMA, net is the network being trained (dropout on)
            metrics = self.evaluator(self.method.student_model(net))
        dt = time.perf_counter() - t0
        self.eval_seconds += dt
        self._last_eval_dt = dt
        rec = {"nimg": self.nimg, "kimg": self.nimg / 1000, "iteration": self.iteration,
               "train_seconds": self.elapsed, "eval_seconds": dt, **metrics}
        self.run.append_jsonl("metrics.jsonl", rec)
        self.run.scalars({f"eval/{k}": v for k, v in metrics.items()}, self.nimg)
        share = self.eval_seconds / max(self.elapsed + self.eval_seconds, 1e-9)
        self.run.log(f"eval at {self.nimg / 1000:.1f} kimg: "
                     + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
                     + f" ({dt:.1f}s; evaluation share of time so far {share:.1%})")
        return metrics

    def _eval_over_share(self) -> bool:
        """True (and logged) when the next in-run evaluation would exceed ``eval_max_share`` of the time."""
        s = self.cfg.eval_max_share
        if s is None or self._last_eval_dt is None or self.evaluator is None:
            return False
        est = self._last_eval_dt
        share = (self.eval_seconds + est) / max(self.elapsed + self.eval_seconds + est, 1e-9)
        if share <= s:
            return False
        self.evals_skipped += 1
        self.run.log(f"eval at {self.nimg / 1000:.1f} kimg skipped: it would raise the evaluation share of "
                     f"time to {share:.1%} > eval_max_share {s:.1%}")
        return True

    # ---- the loop -----------------------------------------------------------------------
    def run_training(self, *, max_iterations: int | None = None) -> dict:
        """Train until ``total_kimg`` (or the time budget / ``max_iterations``); returns a summary."""
        cfg, m = self.cfg, self.method
        self._setup()
        state = self.latest_state()
        if state is not None:
            self.load_state(state)
            self.run.log(f"resumed from {state.name} at {self.nimg / 1000:.3f} kimg", echo=True)
        else:
            self.run.log(f"start: method={m.name} device={self.device} processes={self.world}")
        if self.run.main:  # after the state loaded: a run it cannot resume keeps its own config
            self.run.write_json("config.json", {**self.run_config, "train": to_dict(cfg)})
        done = self._finished_summary()
        if done is not None:
            self.run.log(f"already complete at {self.nimg / 1000:.3f} kimg: nothing to train (summary.json kept)",
                         echo=True)
            self.run.close()
            return done
        if cfg.eval_every_kimg > 0 and self.evaluator is not None:
            self.run.log(f"in-run evaluation every {cfg.eval_every_kimg:g} kimg"
                         + (f", skipped when it would exceed {cfg.eval_max_share:.0%} of the time"
                            if cfg.eval_max_share else ", whatever its share of the time"))
        if cfg.tensorboard:
            self.run.enable_tensorboard()
        total = int(round(cfg.total_kimg * 1000))
        per_iter = m.images_per_iteration(cfg.batch_size) * self.world
        marks = {k: self.nimg // int(getattr(cfg, f"{k}_every_kimg") * 1000)
                 for k in ("log", "snapshot", "checkpoint")}
        eval_mark = self.nimg // int(cfg.eval_every_kimg * 1000) if cfg.eval_every_kimg > 0 else None
        stats: dict[str, list] = {}
        bar = None
        if self.run.main and cfg.progress:
            from tqdm import tqdm

            bar_total = -(-total // per_iter) * per_iter  # whole iterations
            budget = cfg.max_minutes * 60 if cfg.max_minutes is not None else None
            time_bar = budget is not None and budget < 1e6  # a wall-clock budget: the bar shows time
            if time_bar:
                bar = tqdm(total=budget, initial=min(self.elapsed, budget), unit="s", desc=m.name,
                           bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of training [{elapsed}{postfix}]")
            else:
                bar = tqdm(total=bar_total / 1000, initial=self.nimg / 1000, unit="kimg", desc=m.name,
                           bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}{postfix}]")
        t_start = time.perf_counter()
        elapsed0 = self.elapsed
        iters_this_run = 0
        last_metric = None
        stop_reason = "done"
        interrupt = _CtrlC(speak=self.run.main)
        try:
            while self.nimg < total:
                if max_iterations is not None and iters_this_run >= max_iterations:
                    stop_reason = "max_iterations"
                    break
                if interrupt.armed or cfg.max_minutes is not None:  # one decision of rank 0's per iteration
                    stop = dist.rank0_choice(1 if interrupt.pressed else 2 if cfg.max_minutes is not None
                                             and self.elapsed >= cfg.max_minutes * 60 else 0)
                    if stop:
                        stop_reason = ("interrupted", "time budget")[stop - 1]
                        break
                t_it = time.perf_counter()
                m.begin_iteration(self.nimg, total)
                batch = self._batch()
                for phase in m.phases():
                    self._run_phase(phase, batch, stats)
                m.end_iteration(self.nimg)
                self.nimg += per_iter
                self.iteration += 1
                iters_this_run += 1
                if self.ema is not None:
                    # the ramp-up caps the half-life at the images seen *before* this step, as EDM's loop does
                    # (its cur_nimg is incremented after the EMA update): the first step copies the weights
                    beta = ema_beta(per_iter, cfg.ema_halflife_kimg, self.nimg - per_iter, cfg.ema_rampup)
                    self.ema.update(beta)
                self.elapsed = elapsed0 + (time.perf_counter() - t_start) - self._pause
                stats.setdefault("sec_per_iter", []).append(time.perf_counter() - t_it)
                if bar is not None:
                    bar.update(min(self.elapsed, budget) - bar.n if time_bar else per_iter / 1000)
                crossed = {k: self.nimg // int(getattr(cfg, f"{k}_every_kimg") * 1000) > marks[k] for k in marks}
                done = self.nimg >= total
                if crossed["log"] or done:
                    marks["log"] = self.nimg // int(cfg.log_every_kimg * 1000)
                    rec = {k: sum(v) / len(v) for k, v in stats.items() if v}
                    rec = dist.all_reduce_mean(rec)
                    rec.update({"nimg": self.nimg, "kimg": self.nimg / 1000, "iteration": self.iteration,
                                "train_seconds": round(self.elapsed, 3), "nonfinite_losses": self.nonfinite_total,
                                "nonfinite_grad_steps": self.nonfinite_grads})
                    self.run.append_jsonl("stats.jsonl", rec)
                    self.run.scalars({k: v for k, v in rec.items() if "/" in k or k == "sec_per_iter"}, self.nimg)
                    if bar is not None:
                        post = {k.split("/", 1)[1]: f"{v:.4g}" for k, v in rec.items() if k.startswith("loss/")}
                        post["it/s"] = f"{1.0 / max(rec.get('sec_per_iter', 1e-9), 1e-9):.1f}"
                        post["img/s"] = f"{per_iter / max(rec.get('sec_per_iter', 1e-9), 1e-9):.0f}"
                        if time_bar:
                            post["kimg"] = f"{self.nimg / 1000:.1f}"
                        if last_metric:
                            post.update(last_metric)
                        bar.set_postfix(post, refresh=False)
                    stats = {}
                if eval_mark is not None and self.nimg // int(cfg.eval_every_kimg * 1000) > eval_mark and not done:
                    eval_mark = self.nimg // int(cfg.eval_every_kimg * 1000)
                    t_e = time.perf_counter()
                    res = None if self._eval_over_share() else self._evaluate()
                    self._pause += time.perf_counter() - t_e
                    if res:
                        from ..eval.tables import primary_metric

                        pm = primary_metric(res) or next(((k, v, False) for k, v in res.items()
                                                          if isinstance(v, (int, float))), None)
                        last_metric = {pm[0]: f"{pm[1]:.4g}"} if pm else None
                if crossed["snapshot"] and not done:
                    marks["snapshot"] = self.nimg // int(cfg.snapshot_every_kimg * 1000)
                    t_e = time.perf_counter()
                    self._snapshot()
                    self._pause += time.perf_counter() - t_e
                if crossed["checkpoint"] and not done:
                    marks["checkpoint"] = self.nimg // int(cfg.checkpoint_every_kimg * 1000)
                    self.save_state()
        finally:
            interrupt.disarm()
        if bar is not None:
            bar.close()
        self.save_state()
        partial = stop_reason in ("max_iterations", "interrupted")
        self._snapshot(final=not partial)
        final_metrics = None if partial else self._evaluate()
        summary = {"method": m.name, "stop_reason": stop_reason, "nimg": self.nimg, "kimg": self.nimg / 1000,
                   "iterations": self.iteration, "train_seconds": round(self.elapsed, 3),
                   "eval_seconds": round(self.eval_seconds, 3),
                   "eval_share": round(self.eval_seconds / max(self.elapsed + self.eval_seconds, 1e-9), 4),
                   "evals_skipped": self.evals_skipped,
                   "sec_per_iter": self.elapsed / max(self.iteration, 1),
                   "nonfinite_losses": self.nonfinite_total, "nonfinite_grad_steps": self.nonfinite_grads,
                   "processes": self.world, "final_metrics": final_metrics}
        self.run.write_json("summary.json", summary)
        self.run.log(f"stopped ({stop_reason}) at {self.nimg / 1000:.3f} kimg after {self.elapsed:.1f}s of training", echo=cfg.progress)
        self.run.close()
        dist.barrier()  # ranks leave together (rank 0 evaluated and wrote alone)
        if stop_reason == "interrupted":  # the state is saved: now interrupt the caller as Ctrl-C would have
            raise KeyboardInterrupt(f"training interrupted at {self.nimg / 1000:.3f} kimg; state saved")
        return summary


__all__ = ["PRECISIONS", "TrainConfig", "Trainer", "autocast"]
