"""``fewstep bench``: every distillation method on one teacher, one budget, one set of seeds.

    fewstep bench --teacher shipped:digits --methods sid,dmd,diff-instruct,progressive \\
        --budget-minutes 5 --out bench_digits

For each method (sequentially, through the shared :class:`~fewstep.training.loop.Trainer`,
with the method's own ``train_defaults``): train on the same teacher with the same
seed and the same budget (``--budget-kimg`` images seen, or ``--budget-minutes`` of
training time), with in-run evaluations for the curves; then evaluate every student
(every stage's student for methods that save ``RUN/stages/steps-<N>/``, each at its
own NFE) and the teacher under several samplers and step counts, all with the same
metric, the same sample count and the same noise seed. Writes to ``--out``::

    results.json          everything (config, environment, every row, curves, skipped methods)
    results.md            the comparison table (quality beside diversity, NFE, images seen, time)
    metric_vs_time.png    headline metric vs training wall-clock, every method on one chart
    metric_vs_kimg.png    headline metric vs images seen
    metric_vs_nfe.png     headline metric vs NFE: teacher samplers and students
    samples.png           sample grids (or scatter plots) side by side, same noise
    runs/<method>/        each method's run folder (``fewstep report`` renders it)

A method joins the bench by registering itself (:func:`fewstep.methods.register_method`);
the harness names none. A method that cannot be built for this teacher (e.g. it
needs ``--init`` for an exact mixture teacher) or that fails while training is
reported as skipped/failed with the reason; the bench goes on.

A time budget is made equal for staged methods too: a short probe (a few
iterations, part of the method's own run and of its budget) measures each
method's throughput, from which its images budget is set (so progressive
distillation can plan its stages and the curves get evenly spaced evaluations);
the run stops at that many images or at the time budget, whichever comes first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from .errors import FewstepError

PROBE_ITERATIONS = 6


@dataclass
class BenchConfig:
    """What ``fewstep bench`` runs (every field is a CLI option)."""

    teacher: str
    out: str
    methods: list[str] | None = None  # None: every registered method that cuts sampling steps (not guidance distillation)
    init: str | None = None
    data: str | None = None
    budget_minutes: float | None = None
    budget_kimg: float | None = None
    seed: int = 0
    eval_seed: int = 1
    batch_size: int | None = None
    eval_n: int = 1000
    curve_points: int = 8
    eval_max_share: float | None = 0.25
    teacher_samplers: list[str] = field(default_factory=lambda: ["heun", "dpmpp-2m"])
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    overrides: dict[str, dict] = field(default_factory=dict)  # method -> {option: value}
    inception: str | None = None
    grid_n: int = 64
    device: str = "cpu"
    progress: bool = True
    tensorboard: bool = False
    command: str = ""

    def validate(self) -> None:
        if (self.budget_minutes is None) == (self.budget_kimg is None):
            raise FewstepError("give exactly one budget: --budget-minutes M (training time per method) "
                               "or --budget-kimg K (images seen per method)")
        if (self.budget_minutes or 1) <= 0 or (self.budget_kimg or 1) <= 0:
            raise FewstepError("the budget must be > 0")
        if self.eval_n < 10:
            raise FewstepError(f"--eval-n must be >= 10, got {self.eval_n}")
        if self.curve_points < 0:
            raise FewstepError("--curve-points must be >= 0")
        if any(s < 1 for s in self.teacher_steps):
            raise FewstepError("--teacher-steps must be positive integers")

    def to_command(self) -> str:
        """The ``fewstep bench`` command line that runs this configuration (options at defaults left out)."""
        import shlex

        default = BenchConfig(teacher="", out="")
        parts = ["fewstep", "bench", "--teacher", self.teacher, "--out", self.out]
        for f in fields(self):
            name = f.name
            v, d = getattr(self, name), getattr(default, name)
            if name in ("teacher", "out", "command", "overrides") or v == d:
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(v, bool):
                parts.append(flag if v else "--no-" + name.replace("_", "-"))
            elif isinstance(v, (list, tuple)):
                parts += [flag, ",".join(str(x) for x in v)]
            else:
                parts += [flag, str(v)]
        for m, opts in self.overrides.items():
            for k, v in opts.items():
                parts += ["--set", f"{m}.{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        return " ".join(shlex.quote(p) for p in parts)


# ---------------------------------------------------------------------------------------- helpers
def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def environment(device: str) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "device": device,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def registered_methods() -> dict:
    """Every registered distillation method by name (teacher training excluded)."""
    from .methods.base import METHODS, get_method

    get_method("teacher")  # imports the built-in methods, which register themselves
    return {k: v for k, v in sorted(METHODS.items()) if k != "teacher"}


def _split_overrides(cls, overrides: dict) -> tuple[dict, dict]:
    """Per-method options → (method-config values, training-loop values); unknown names are errors."""
    from .training.loop import TrainConfig

    mnames = {f.name for f in fields(cls.Config)}
    tnames = {f.name for f in fields(TrainConfig)}
    mc, tc = {}, {}
    for k, v in overrides.items():
        key = k.replace("-", "_")
        if key in mnames:
            mc[key] = v
        elif key in tnames:
            tc[key] = v
        else:
            raise FewstepError(f"--set {cls.name}.{k}: {cls.name} has no option {k!r}; its options: "
                               f"{', '.join(sorted(mnames))}; loop options: {', '.join(sorted(tnames))}")
    return mc, tc


def _primary(rows_or_metrics):
    from .eval.tables import primary_metric

    return primary_metric(rows_or_metrics)


def _points_precision_recall(model, data: str, n: int, seed: int, sampler, steps) -> dict:
    """k-NN precision/recall (k=3) of point samples against the reference the metrics use."""
    from .eval import metrics as M
    from .eval.runner import mixture_for

    mix = mixture_for(data)
    if mix is not None:
        ref = mix.sample(n, generator=torch.Generator().manual_seed(seed + 1)).float()
    else:
        from .data import load_dataset

        x = load_dataset(data, split="train").x
        ref = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]
    x = model.sample(n, seed=seed, sampler=sampler, steps=steps, batch_size=500).x.detach().cpu().float()
    x = x[torch.isfinite(x).all(dim=1)]
    if x.shape[0] <= 3:
        return {}
    p, r = M.precision_recall(ref.reshape(len(ref), -1), x.reshape(len(x), -1), k=3)
    return {"precision": p, "recall": r}


def evaluate(model, cfg: BenchConfig, data: str, *, sampler=None, steps=None) -> dict:
    """One row: ``evaluate_model`` at the bench's sample count and seed (+ point precision/recall)."""
    from .eval.runner import evaluate_model

    r = evaluate_model(model, n=cfg.eval_n, seed=cfg.eval_seed, sampler=sampler, steps=steps, data=data,
                       inception=cfg.inception)
    if r.get("kind") in ("mixture", "points"):
        r.update(_points_precision_recall(model, data, cfg.eval_n, cfg.eval_seed, sampler, steps))
    return r


# ---------------------------------------------------------------------------------------- teacher
def teacher_rows(teacher, cfg: BenchConfig, data: str) -> list[dict]:
    """The teacher under each sampler × step count, plus its own recipe."""
    from .diffusion.samplers import nfe

    rec = teacher.sampling
    grid = [(s, k) for s in cfg.teacher_samplers for k in cfg.teacher_steps]
    own = (rec.get("sampler"), int(rec.get("steps", 18)))
    if own[0] != "one-step" and own not in grid:
        grid.append(own)
    rows, seen = [], set()
    for sampler, steps in grid:
        try:
            key = (sampler, nfe(sampler, steps))
        except Exception as e:  # noqa: BLE001 - unknown sampler names are the user's to fix
            raise FewstepError(f"--teacher-samplers: {e}") from None
        if key in seen:
            continue
        seen.add(key)
        _log(f"teacher: {sampler} {steps} steps")
        r = evaluate(teacher, cfg, data, sampler=sampler, steps=steps)
        rows.append({"model": "teacher", "method": "teacher", "label": f"teacher ({sampler})",
                     "own_recipe": (sampler, steps) == own, **r})
    return rows


# ---------------------------------------------------------------------------------------- methods
def _train_config(cls, cfg: BenchConfig, tc_over: dict, total_kimg: float, eval_every: float):
    from .config import from_dict, to_dict
    from .training.loop import TrainConfig

    values = to_dict(TrainConfig())
    values.update(getattr(cls, "train_defaults", None) or {})
    values.update({"seed": cfg.seed, "device": cfg.device, "progress": cfg.progress, "tensorboard": cfg.tensorboard,
                   "total_kimg": total_kimg, "max_minutes": cfg.budget_minutes, "eval_every_kimg": eval_every,
                   "eval_max_share": cfg.eval_max_share,
                   "snapshot_every_kimg": max(total_kimg / 4, 0.001), "checkpoint_every_kimg": max(total_kimg / 4, 0.001),
                   "log_every_kimg": max(min(values.get("log_every_kimg", 1.0), total_kimg / 20), 0.001)})
    if cfg.batch_size:
        values["batch_size"] = cfg.batch_size
    values.update(tc_over)
    return from_dict(TrainConfig, values)


def _eval_every(total_kimg: float, points: int) -> float:
    return max(total_kimg / points, 0.001) if points > 0 else 0.0


def _probe_total_kimg(make, run_dir: Path, tc, minutes: float, run_config: dict) -> float:
    """Run a few iterations (the start of the real run, which resumes from them) and turn the
    time budget into an images budget from the measured throughput."""
    from .training.loop import Trainer
    from .training.run_dir import RunDir

    probe = replace(tc, total_kimg=1e9, eval_every_kimg=0.0, log_every_kimg=0.001, snapshot_every_kimg=1e9,
                    checkpoint_every_kimg=1e9, progress=False, tensorboard=False)
    method, dataset = make()
    trainer = Trainer(method, probe, str(run_dir), dataset=dataset, evaluator=None,
                      run_config={**run_config, "bench_probe": True})
    s = trainer.run_training(max_iterations=PROBE_ITERATIONS)
    its = [r["sec_per_iter"] for r in RunDir(run_dir, main_process=False).read_jsonl("stats.jsonl")
           if "sec_per_iter" in r]
    per_iter = s["nimg"] / max(s["iterations"], 1)
    steady = sorted(its[1:] or its)
    sec = steady[len(steady) // 2] if steady else max(s["train_seconds"], 1e-3) / max(s["iterations"], 1)
    remaining = max(minutes * 60 - s["train_seconds"], 0.0)
    total = (s["nimg"] + per_iter * remaining / max(sec, 1e-6)) / 1000
    return max(round(total, 3), s["nimg"] / 1000 + per_iter / 1000)


def _students(run_dir: Path) -> list[tuple[str, Path]]:
    """(label suffix, model folder) of every student a run produced: its stages, else RUN/model."""
    from .model import resolve_model_dir

    stages = []
    for d in (run_dir / "stages").glob("steps-*"):
        try:
            stages.append((int(d.name.split("-", 1)[1]), d))
        except ValueError:
            continue
    final = resolve_model_dir(run_dir)
    if not stages:
        return [("", final)]

    def steps(n: int) -> str:
        return f"{n} step" + ("s" if n != 1 else "")

    out = [(steps(n), d) for n, d in sorted(stages, reverse=True) if (d / "model.safetensors").is_file()]
    n_final = json.loads((final / "config.json").read_text()).get("sampling", {}).get("steps")
    if n_final is not None and int(n_final) not in {n for n, _ in stages}:
        out.append((f"{steps(int(n_final))}, stage cut short by the budget", final))
    return out


def run_method(name: str, cls, cfg: BenchConfig, data: str, out: Path) -> dict:
    """Train one method under the bench's budget and evaluate its students; never raises for the method's own failures."""
    from .config import from_dict, to_dict
    from .eval.runner import make_evaluator
    from .model import load_model
    from .training.loop import Trainer
    from .training.run_dir import RunDir
    from . import __version__

    entry: dict = {"method": name, "summary": cls.summary, "uses_data": bool(cls.uses_data)}
    mc_over, tc_over = _split_overrides(cls, cfg.overrides.get(name, {}))
    mcfg = from_dict(cls.Config, {**to_dict(cls.Config()), **mc_over})
    run_dir = out / "runs" / name
    identity = {"method": name, "method_config": to_dict(mcfg), "teacher": cfg.teacher, "init": cfg.init,
                "data": data, "seed": cfg.seed, "budget_minutes": cfg.budget_minutes,
                "budget_kimg": cfg.budget_kimg, "batch_size": cfg.batch_size, "train_overrides": tc_over}
    run_config = {"method": name, "method_config": to_dict(mcfg), "teacher": cfg.teacher, "init": cfg.init,
                  "data": data, "command": cfg.command or cfg.to_command(), "fewstep_version": __version__,
                  "bench": identity}

    def make():
        teacher = load_model(cfg.teacher, device=cfg.device)  # a fresh copy per method: nothing leaks between runs
        init = load_model(cfg.init, device=cfg.device) if cfg.init else None
        dataset = None
        if cls.uses_data:
            from .data import load_dataset

            dataset = load_dataset(data, split="train")
            if teacher.data_info.num_classes == 0:
                dataset.labels = None
        torch.manual_seed(cfg.seed)
        return cls.create(mcfg, teacher=teacher, dataset=dataset, init=init), dataset

    try:
        make()  # constructs for this teacher? (cheap; the run builds its own copy)
    except Exception as e:  # noqa: BLE001 - a method that does not fit this teacher is skipped, not fatal
        entry.update(status="skipped", reason=_reason(e))
        _log(f"{name}: skipped ({entry['reason']})")
        return entry

    prev = run_dir / "config.json"
    plan = None
    if prev.is_file():  # a re-run of the same bench resumes; anything else is never overwritten
        old = json.loads(prev.read_text())
        if old.get("bench") != identity:
            raise FewstepError(f"{run_dir} holds a run with other settings (method options, budget, seed or "
                               "teacher); use another --out, or delete the folder to start over")
        if old.get("bench_probe"):
            shutil.rmtree(run_dir)  # interrupted during its throughput probe: start the method again
        else:
            plan = old.get("bench_plan")
    t0 = time.perf_counter()
    try:
        if plan is None:
            if cfg.budget_kimg is not None:
                total = float(cfg.budget_kimg)
                plan = {"total_kimg": total, "source": "budget_kimg"}
            else:
                tc0 = _train_config(cls, cfg, tc_over, 1e9, 0.0)
                _log(f"{name}: probing throughput ({PROBE_ITERATIONS} iterations)")
                total = _probe_total_kimg(make, run_dir, tc0, cfg.budget_minutes, run_config)
                plan = {"total_kimg": total, "source": f"throughput probe ({PROBE_ITERATIONS} iterations)"}
            plan["eval_every_kimg"] = _eval_every(plan["total_kimg"], cfg.curve_points)
        if "total_kimg" in tc_over:
            plan["total_kimg"] = float(tc_over["total_kimg"])
        tc = _train_config(cls, cfg, tc_over, plan["total_kimg"], plan["eval_every_kimg"])
        tc.validate()
        method, dataset = make()
        try:
            evaluator = make_evaluator(data, n=cfg.eval_n, seed=cfg.eval_seed)
        except FewstepError as e:  # e.g. images fewstep has no feature net for: measured after training only
            _log(f"{name}: no in-run curve ({e})")
            evaluator = None
        _log(f"{name}: training ({tc.total_kimg:g} kimg" + (f", at most {cfg.budget_minutes:g} min" if
                                                             cfg.budget_minutes else "") + ")")
        trainer = Trainer(method, tc, str(run_dir), dataset=dataset, evaluator=evaluator,
                          run_config={**run_config, "bench_plan": plan})
        summary = trainer.run_training()
    except Exception as e:  # noqa: BLE001 - one method's failure must not end the bench
        entry.update(status="failed", reason=_reason(e), run_dir=str(run_dir))
        _log(f"{name}: failed ({entry['reason']})")
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "logs" / f"{name}.txt").write_text(traceback.format_exc())
        return entry
    entry.update(status="ok", run_dir=str(run_dir), plan=plan, wall_seconds=round(time.perf_counter() - t0, 2),
                 train={k: summary.get(k) for k in ("kimg", "iterations", "train_seconds", "eval_seconds",
                                                     "eval_share", "evals_skipped", "sec_per_iter", "stop_reason",
                                                     "nonfinite_losses")},
                 method_config=to_dict(mcfg), train_config=to_dict(tc))
    entry["curve"] = [{k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                      for r in RunDir(run_dir, main_process=False).read_jsonl("metrics.jsonl")]
    rows = []
    try:
        for suffix, folder in _students(run_dir):
            student = load_model(folder, device=cfg.device)
            _log(f"{name}: evaluating {folder.relative_to(out) if folder.is_relative_to(out) else folder}")
            # its own recipe, then any further step counts the method samples at (a consistency model: k steps)
            for steps in (None, *cls.bench_steps):
                r = evaluate(student, cfg, data, steps=steps)
                label = (f"{name} ({suffix})" if suffix else name) + (f" ({steps} steps)" if steps else "")
                rows.append({"model": name, "method": name, "label": label,
                             "checkpoint": str(folder), "train_kimg": summary["kimg"],
                             "train_seconds": summary["train_seconds"], "stop_reason": summary["stop_reason"], **r})
    except Exception as e:  # noqa: BLE001 - the trained run stays; its evaluation failure is reported
        entry.update(status="failed", reason="evaluation: " + _reason(e))
        _log(f"{name}: evaluation failed ({entry['reason']})")
    entry["rows"] = rows
    return entry


def _reason(e: Exception) -> str:
    msg = str(e).strip() or type(e).__name__
    return msg if isinstance(e, FewstepError) else f"{type(e).__name__}: {msg}"


# ---------------------------------------------------------------------------------------- outputs
def _sample_pictures(models: dict, cfg: BenchConfig, data: str, out: Path) -> str | None:
    """Side-by-side samples of the same noise: grids for images, scatter plots for points."""
    from .eval.plots import save_comparison_grid, save_scatter

    if not models:
        return None
    xs = {}
    for label, (model, sampler, steps) in models.items():
        res = model.sample(cfg.grid_n, seed=cfg.eval_seed, sampler=sampler, steps=steps)
        xs[f"{label} · NFE {res.nfe}"] = res.x.detach().cpu().float()
    kind = next(iter(models.values()))[0].data_info.kind
    path = out / "samples.png"
    if kind == "images":
        save_comparison_grid(xs, path, title=f"same noise (seed {cfg.eval_seed})")
        return path.name
    from PIL import Image

    from .eval.runner import mixture_for

    mix = mixture_for(data)
    ref = mix.sample(2000, generator=torch.Generator().manual_seed(0)) if mix is not None else None
    panels = []
    for i, (label, x) in enumerate(xs.items()):
        p = save_scatter(x, out / "grids" / f"{i:02d}.png", reference=ref, title=label)
        panels.append(Image.open(p).convert("RGB"))
    w, h = sum(p.width for p in panels), max(p.height for p in panels)
    sheet = Image.new("RGB", (w, h), "white")
    x0 = 0
    for p in panels:
        sheet.paste(p, (x0, 0))
        x0 += p.width
    sheet.save(path)
    return path.name


def _plots(result: dict, out: Path) -> dict:
    from .eval.plots import plot_curves
    from .eval.tables import metric_label

    files = {}
    rows = result["rows"]
    pm = next((_primary(r) for r in rows if _primary(r)), None)
    if pm is None:
        return files
    key, _, higher = pm
    ylabel = f"{metric_label(key)} ({'higher' if higher else 'lower'} is better), n={result['meta']['eval_n']}"
    teacher_own = next((r for r in rows if r["model"] == "teacher" and r.get("own_recipe")), None)
    for xkey, fname, xlabel in (("train_seconds", "metric_vs_time.png", "training wall-clock (s)"),
                                ("kimg", "metric_vs_kimg.png", "images seen (kimg)")):
        series = {}
        for name, m in result["methods"].items():
            pts = [(c[xkey], c[key]) for c in m.get("curve", []) if xkey in c and key in c]
            if pts:
                series[name] = ([p[0] for p in pts], [p[1] for p in pts])
        if not series:
            continue
        if teacher_own is not None:
            lo = min(min(s[0]) for s in series.values())
            hi = max(max(s[0]) for s in series.values())
            series[f"teacher {teacher_own['sampler']}, NFE {teacher_own['nfe']}"] = ([lo, hi], [teacher_own[key]] * 2)
        plot_curves(series, out / fname, xlabel=xlabel, ylabel=ylabel,
                    title=f"{result['meta']['teacher']}: students during training (same seed, same budget)")
        files["metric vs training time" if xkey == "train_seconds" else "metric vs images seen"] = fname
    series = {}
    for r in rows:
        if key not in r:
            continue
        name = f"teacher {r['sampler']}" if r["model"] == "teacher" else r["model"]
        series.setdefault(name, ([], []))
        series[name][0].append(r["nfe"])
        series[name][1].append(r[key])
    series = {k: tuple(map(list, zip(*sorted(zip(*v))))) for k, v in series.items()}
    if series:
        plot_curves(series, out / "metric_vs_nfe.png", xlabel="NFE (network evaluations per sample)", ylabel=ylabel,
                    logx=True, title=f"{result['meta']['teacher']}: quality vs sampling cost")
        files["metric vs NFE"] = "metric_vs_nfe.png"
    return files


def markdown(result: dict) -> str:
    """The bench's Markdown report: one table with quality, diversity, NFE, images seen and time."""
    from .eval.tables import columns, markdown_table

    meta = result["meta"]
    rows = result["rows"]
    budget = (f"{meta['budget_minutes']:g} min of training" if meta.get("budget_minutes")
              else f"{meta['budget_kimg']:g} kimg")
    env = meta["environment"]
    lines = [f"# fewstep bench: {meta['teacher']}", "",
             f"Budget per method: {budget}; training seed {meta['seed']}; every row: n = {meta['eval_n']} samples, "
             f"noise seed {meta['eval_seed']}, data `{meta['data']}`. {env['machine']}, {env['threads']} threads, "
             f"torch {env['torch']}, device {env['device']}; {env['date']}.", "",
             f"Command: `{meta['command']}`", ""]
    if rows:
        cols = columns(rows[0])
        headers = ["model", "sampler", "steps", "NFE"] + [c[0] for c in cols] + [
            "train kimg", "train s", "stopped", "samples/s"]
        body = [[r["label"], r["sampler"], r.get("steps"), r["nfe"]] + [r.get(k) for _, k in cols]
                + [r.get("train_kimg"), r.get("train_seconds"), r.get("stop_reason"), r.get("samples_per_second")]
                for r in rows]
        lines += [markdown_table(headers, body), ""]
        kind = rows[0].get("kind")
        if kind == "images":
            lines.append("FD/KID/precision/recall in the feature space of fewstep's own classifier (not Inception "
                         "FID unless a FID (Inception) column is shown); FD floor: held-out real images, at the n "
                         "its header states (the test split may hold fewer than the samples; the FD of that many "
                         "samples is then shown beside it). "
                         "Class imbalance: max relative deviation of the classifier's class histogram from uniform "
                         "(0 = balanced; a mode-collapsed student scores high).")
        elif kind == "mixture":
            lines.append("Log-likelihood under the exact mixture density (true samples reach *true log-lik*); "
                         "precision/recall by k-NN (k = 3) against true samples; mode coverage: share of components "
                         "that receive at least 10 % of their expected samples.")
        lines.append("")
    hist_key = next((k for k in (rows[0] if rows else {}) if k.startswith("class_hist_")), None)
    if hist_key:
        lines += ["Class histograms (fraction per predicted class):", ""]
        lines += [f"- {r['label']} (NFE {r['nfe']}): " + " ".join(f"{v:.2f}" for v in r[hist_key])
                  for r in rows if hist_key in r]
        lines.append("")
    trained = [(n, m) for n, m in result["methods"].items() if m.get("status") == "ok"]
    if trained:
        lines += ["## Training", "",
                  markdown_table(["method", "images seen (kimg)", "iterations", "train s", "eval share",
                                  "evals skipped", "stopped", "budget plan"],
                                 [[n, m["train"]["kimg"], m["train"]["iterations"], m["train"]["train_seconds"],
                                   m["train"].get("eval_share"), m["train"].get("evals_skipped"),
                                   m["train"]["stop_reason"], m["plan"]["source"]] for n, m in trained]), ""]
    skipped = {n: m for n, m in result["methods"].items() if m.get("status") != "ok"}
    skipped.update(result.get("absent", {}))
    if skipped:
        lines += ["## Not in the comparison", ""]
        for n, m in skipped.items():
            status, reason = (m["status"], m["reason"]) if isinstance(m, dict) else ("absent", m)
            lines.append(f"- **{n}** ({status}): {reason}")
        lines.append("")
    figs = result.get("files", {})
    if figs:
        lines += ["## Figures", ""] + [f"![{k}]({v})" for k, v in figs.items()] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the bench
def run_bench(cfg: BenchConfig) -> dict:
    """Run the bench (see module docstring); returns what ``results.json`` holds."""
    from .eval.inception import resolve_weights_path
    from .model import load_model
    from .training.checkpoint import atomic_write_text

    cfg.validate()
    cfg.inception = str(resolve_weights_path(cfg.inception)) if resolve_weights_path(cfg.inception) else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    available = registered_methods()
    wanted = cfg.methods or [m for m, c in available.items() if c.bench_default]
    for m in cfg.overrides:
        if m not in wanted:
            raise FewstepError(f"--set {m}.…: {m!r} is not among the benched methods ({', '.join(wanted)})")
    absent = {m: f"not a registered method (registered: {', '.join(available)})" for m in wanted
              if m not in available}
    for m, why in absent.items():
        _log(f"{m}: absent, {why}")
    for m, opts in cfg.overrides.items():  # unknown option names fail now, not after the teacher's evaluations
        if m in available:
            _split_overrides(available[m], opts)
    teacher = load_model(cfg.teacher, device=cfg.device)
    data = cfg.data or teacher.data_info.name
    if not data:
        raise FewstepError("the teacher does not name its dataset: pass --data NAME")
    t0 = time.perf_counter()
    result = {"format": "fewstep.bench", "version": 1,
              "meta": {"teacher": cfg.teacher, "init": cfg.init, "data": data, "methods": wanted,
                       "budget_minutes": cfg.budget_minutes, "budget_kimg": cfg.budget_kimg, "seed": cfg.seed,
                       "eval_seed": cfg.eval_seed, "eval_n": cfg.eval_n, "batch_size": cfg.batch_size,
                       "curve_points": cfg.curve_points, "eval_max_share": cfg.eval_max_share,
                       "teacher_samplers": cfg.teacher_samplers, "teacher_steps": cfg.teacher_steps,
                       "overrides": cfg.overrides, "inception": Path(cfg.inception).name if cfg.inception else None,
                       "command": cfg.command or cfg.to_command(), "environment": environment(cfg.device)},
              "methods": {}, "absent": absent}
    trows = teacher_rows(teacher, cfg, data)
    for name in wanted:
        if name in available:
            result["methods"][name] = run_method(name, available[name], cfg, data, out)
    result["rows"] = trows + [r for m in result["methods"].values() for r in m.get("rows", [])]
    result["teacher_rows"] = trows
    # pictures: the teacher's own recipe and each method's final student, same noise
    pics = {}
    own = next((r for r in trows if r.get("own_recipe")), trows[-1] if trows else None)
    if own is not None:
        pics[f"teacher {own['sampler']}"] = (teacher, own["sampler"], own.get("steps"))
    for name, m in result["methods"].items():
        if m.get("rows"):
            last = m["rows"][-1]
            pics[last["label"]] = (load_model(last["checkpoint"], device=cfg.device), None, None)
    files = {}
    try:
        files = _plots(result, out)
        pic = _sample_pictures(pics, cfg, data, out)
        if pic:
            files["samples, same noise"] = pic
    except Exception as e:  # noqa: BLE001 - figures must not lose the numbers
        _log(f"figures failed: {_reason(e)}")
    result["files"] = files
    result["meta"]["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(out / "results.md", markdown(result) + "\n")
    try:
        from .eval.report import write_report

        write_report(out)  # OUT/report.html: the same in one self-contained page
    except Exception as e:  # noqa: BLE001
        _log(f"report.html failed: {_reason(e)}")
    _log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'report.html'} and {len(files)} figures")
    return result


# ---------------------------------------------------------------------------------------- CLI
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_set(items: list[str] | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise FewstepError(f"--set expects METHOD.OPTION=VALUE (e.g. progressive.start_steps=16), got {item!r}")
        lhs, value = item.split("=", 1)
        method, opt = lhs.split(".", 1)
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            v = value
        out.setdefault(method, {})[opt] = v
    return out


def add_parser(sub) -> None:
    """Register ``fewstep bench`` on the CLI's subparsers."""
    p = sub.add_parser("bench", help="compare distillation methods on one teacher: same budget, seeds and metric",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher: run folder, model folder, shipped:NAME, mixture:PRESET, or a diffusers folder (a UNet2DModel saved with its scheduler)")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, plots, runs/)")
    p.add_argument("--methods", type=_csv, default=None,
                   help="comma-separated methods (default: every registered one that cuts sampling steps; guidance distillation only when named); unregistered names are listed as absent")
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--budget-minutes", type=float, default=None, help="training time per method (minutes)")
    b.add_argument("--budget-kimg", type=float, default=None, help="images seen per method (thousands)")
    p.add_argument("--init", default=None, help="initialise students from this model (needed for exact mixture teachers)")
    p.add_argument("--data", default=None, help="dataset for data-based methods and evaluation (default: the teacher's)")
    p.add_argument("--seed", type=int, default=0, help="training seed, the same for every method (default 0)")
    p.add_argument("--eval-seed", type=int, default=1, help="noise seed of every evaluation (default 1)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size for every method (default: each method's)")
    p.add_argument("--eval-n", type=int, default=1000, help="samples per evaluation, the same everywhere (default 1000)")
    p.add_argument("--curve-points", type=int, default=8, help="in-run evaluations per method for the curves (default 8)")
    p.add_argument("--eval-max-share", type=float, default=0.25,
                   help="skip in-run evaluations beyond this share of the time (default 0.25)")
    p.add_argument("--teacher-samplers", type=_csv, default=["heun", "dpmpp-2m"],
                   help="teacher samplers to evaluate (default heun,dpmpp-2m)")
    p.add_argument("--teacher-steps", type=lambda s: [int(v) for v in _csv(s)], default=[1, 2, 4, 8, 16],
                   help="teacher step counts (default 1,2,4,8,16; heun NFE = 2·steps − 1); the teacher's own recipe is added")
    p.add_argument("--set", dest="overrides", action="append", metavar="METHOD.OPTION=VALUE",
                   help="a method or loop option for one method, e.g. progressive.start_steps=16 (repeatable)")
    p.add_argument("--inception", default=None,
                   help="standard FID Inception weights file (or $FEWSTEP_INCEPTION): adds Inception FID for images")
    p.add_argument("--grid-n", type=int, default=64, help="samples per picture (default 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.add_argument("--tensorboard", action="store_true", help="TensorBoard event files in each run folder")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .cli import _threads

    _threads()
    cfg = BenchConfig(teacher=args.teacher, out=args.out, methods=args.methods, init=args.init, data=args.data,
                      budget_minutes=args.budget_minutes, budget_kimg=args.budget_kimg, seed=args.seed,
                      eval_seed=args.eval_seed, batch_size=args.batch_size, eval_n=args.eval_n,
                      curve_points=args.curve_points, eval_max_share=args.eval_max_share,
                      teacher_samplers=args.teacher_samplers, teacher_steps=args.teacher_steps,
                      overrides=_parse_set(args.overrides), inception=args.inception, grid_n=args.grid_n,
                      device=args.device, progress=args.progress, tensorboard=args.tensorboard)
    cfg.command = cfg.to_command()  # canonical: the same however the bench was invoked
    run_bench(cfg)
    print((Path(cfg.out) / "results.md").read_text())
    return 0


__all__ = ["BenchConfig", "add_parser", "markdown", "registered_methods", "run_bench"]
