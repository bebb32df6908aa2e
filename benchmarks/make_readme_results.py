"""Regenerate the README's results section from the files in benchmarks/results/.

    python benchmarks/make_readme_results.py            # rewrite README.md between the markers
    python benchmarks/make_readme_results.py --check    # exit 1 if README.md is out of date

Only the block between ``<!-- results:start -->`` and ``<!-- results:end -->`` is
rewritten (the markers are appended if README.md lacks them; the file is created
if missing). Every number stands beside the command that produced it. Sources,
each optional: ``teachers.json`` (benchmarks/teachers.py), ``sid.json``
(benchmarks/sid.py), ``progressive*.json`` (benchmarks/progressive.py),
``diffusers_teacher.json`` (benchmarks/diffusers_teacher.py), ``cd.json`` (benchmarks/cd.py),
``reflow.json`` (benchmarks/reflow.py), ``guidance.json`` (benchmarks/guidance.py), ``boot.json``
(benchmarks/boot.py), ``sds.json`` (benchmarks/sds.py) and ``fewstep bench`` outputs (``*.json`` or ``*/results.json`` with
``"format": "fewstep.bench"``). A missing or malformed file is skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
sys.path.insert(0, str(ROOT))


def _fmt(v) -> str:
    from fewstep.eval.tables import fmt

    return fmt(v)


def _table(headers, rows) -> str:
    from fewstep.eval.tables import markdown_table

    return markdown_table(headers, rows)


def _primary(m: dict):
    from fewstep.eval.tables import primary_metric

    return primary_metric(m or {})


def _label(key: str) -> str:
    from fewstep.eval.tables import metric_label

    return metric_label(key)


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return e


def _code(cmd: str) -> str:
    return f"`{cmd}`" if cmd else ""


# ---------------------------------------------------------------------------------------- sections
def teachers_section(d: dict) -> list[str]:
    out = ["### Teachers: quality vs NFE per sampler", ""]
    for name, t in (d.get("teachers") or {}).items():
        ev = t.get("evaluation") or {}
        curves = ev.get("curves") or {}
        first = next((r for rows in curves.values() for r in rows), {})
        pm = _primary(first)
        if pm is None:
            continue
        key = pm[0]
        nfes = sorted({r.get("nfe") for rows in curves.values() for r in rows if r.get("nfe") is not None})
        body = []
        for sampler, rows in curves.items():
            by = {r.get("nfe"): r.get(key) for r in rows}
            body.append([sampler] + [by.get(n) for n in nfes])
        tr = t.get("training") or {}
        n = ev.get("n_samples")
        out += [f"**{name}** — {_label(key)}, n = {n} samples, noise seed 1"
                + (f"; trained {tr.get('kimg', 0):.0f} kimg in {tr.get('train_seconds', 0):.0f} s with "
                   f"{_code(tr.get('command', ''))}" if tr else ""), "",
                _table(["sampler \\ NFE"] + [str(x) for x in nfes], body), "",
                f"Command: {_code(f'python benchmarks/teachers.py --only {name} --eval-only')}; each cell is "
                f"{_code(f'fewstep eval fewstep/assets/teachers/{name} --sampler SAMPLER --steps STEPS --n {n} --seed 1')}.",
                ""]
    return out if len(out) > 2 else []


def sid_section(d: dict, results: Path) -> list[str]:
    cmds = d.get("commands") or {}
    rows = []

    def add(setting, model, m, distill=None, part="", command=None):
        pm = _primary(m or {})
        if pm is None:
            return
        cmd = (distill or {}).get("command") or command or cmds.get(part, "")
        m = m or {}
        div = m.get("mode_coverage", next((v for k, v in m.items() if k.startswith("recall_")), None))
        rows.append([setting, model, m.get("nfe"), f"{_label(pm[0])} = {_fmt(pm[1])}", m.get("n_samples"),
                     _fmt(div) if div is not None else "", _fmt(m.get("samples_per_second")),
                     (distill or {}).get("kimg"), (distill or {}).get("train_seconds"), _code(cmd)])

    shown = set()
    for preset, r in (d.get("mixture") or {}).items():
        mixture = r.get("mixture", preset)
        if mixture not in shown:
            add(f"mixture:{mixture}", "teacher (exact, Heun)", r.get("teacher_exact_heun35"), part="mixture",
                command=r.get("benchmark_command"))
            shown.add(mixture)
        variant = "" if preset == mixture else f" ({preset})"
        add(f"mixture:{mixture}", f"SiD student{variant}", r.get("student_sid_1nfe"), r.get("distill"), "mixture")
    images = _image_runs(d)
    for name, r in images:
        data = r.get("data", name)
        if data not in shown:
            add(data, "teacher (Heun)", r.get("teacher_heun35"), part=name)
            shown.add(data)
        label = {"sid": "SiD", "sida": "SiDA"}.get(r.get("method", "sid"), r.get("method"))
        add(data, f"{label} student" + ("" if name == data else f" ({name})"), r.get("student_sid_1nfe"),
            r.get("distill"), name)
    comp = d.get("compare")
    if isinstance(comp, dict):
        data = comp.get("data", "")
        add(f"{data} (equal wall-clock)", "teacher (Heun)", comp.get("teacher_heun35"), part="compare")
        for m, r in (comp.get("methods") or {}).items():
            add(f"{data} (equal wall-clock)", m, r.get("student_1nfe"), r.get("distill"), "compare")
    if not rows:
        return []
    out = ["### SiD and the fake-score family", "",
           _table(["setting", "model", "NFE", "metric", "n", "modes / recall", "samples/s", "train kimg",
                   "train s", "command"], rows), ""]
    gaps = [(p, r) for p, r in (d.get("mixture") or {}).items() if "loglik_gap_nats" in r]
    if gaps:
        out += ["Exact mixtures, one-step student vs the exact teacher's 35-NFE Heun samples (criterion: "
                "|Δ log-likelihood| ≤ ln 1.05 nats, all modes): " + "; ".join(
                    f"{p} Δ = {_fmt(r['loglik_gap_nats'])} nats ({'within' if r.get('within_5pct') else 'not within'}"
                    f" 5%, {'all' if r.get('all_modes_covered') else 'NOT all'} modes)"
                    + (f", curve `{r['curve_plot']}`" if r.get("curve_plot") else "") + _late_range(r)
                    for p, r in gaps) + ".", ""]
    for p, r in gaps:
        if not r.get("within_5pct"):
            out += _diagnosis_lines(results, p, r)
    if images:
        def line(name, r):
            key, t, s = r["fd_key"], r["teacher_heun35"], r["student_sid_1nfe"]
            t0 = r.get("teacher_heun35_at_curve_seed") or {}
            floor = t.get(key.replace("fd_", "fd_floor_"))
            by_seed = r.get("fd_by_seed") or {}
            seeds = ("; student vs teacher by noise seed " + ", ".join(
                f"{k}: {_fmt(v['student_sid_1nfe'])} vs {_fmt(v['teacher_heun35'])}" for k, v in by_seed.items())
                + f" — at or below the teacher at {r.get('student_at_or_below_teacher_seeds')} of {len(by_seed)}"
                + (f", {r['fd_by_seed_provenance']}" if r.get("fd_by_seed_provenance") else "")
                ) if by_seed else ""
            prov = f" [{r['provenance']}]" if r.get("provenance") else ""
            w = r.get("wide")
            if w:  # ten noise seeds and one large sample set, from benchmarks/sid.py --only wide
                wk = w["fd_key"]
                seeds += (f"; at noise seeds 1-{len(w['fd_by_seed'])} mean {_fmt(w['student_mean'])} (std "
                          f"{_fmt(w['student_std'])}) vs {_fmt(w['teacher_mean'])} ({_fmt(w['teacher_std'])}), at or "
                          f"below the teacher at {w['at_or_below_teacher_seeds']} of {len(w['fd_by_seed'])}; "
                          f"{w['n_large']} samples against {w['n_reference_large']} images: "
                          f"{_fmt(w['student_sid_1nfe_large'][wk])} vs {_fmt(w['teacher_heun35_large'][wk])}, "
                          f"`{w['command']}` on {w['date']}")
            return (f"{name}{prov}: student {_fmt(s[key])} vs teacher {_fmt(t[key])} "
                    f"({'met' if r.get('student_fd_at_or_below_teacher') else 'not met'}; n = {r['n_samples']}, "
                    f"noise seed 1, real-data floor {_fmt(floor)} at n = {t.get('n_floor')}{seeds}) after "
                    f"{_fmt(r['distill']['train_seconds'] / 60)} min of distillation "
                    f"({r['distill']['kimg']:.0f} kimg, {r['distill']['sec_per_iter']:.2f} s per iteration); curve at seed 0 `{r.get('curve_plot')}`, teacher there "
                    f"{_fmt(t0.get(key))}; the student samples {_fmt(r['throughput_ratio_student_over_teacher'])}× as "
                    "fast as the teacher at 35 NFE")
        out += ["Images, one-step student FD vs the teacher's at 35 NFE (Heun), same n and noise seed "
                "(criterion: at or below the teacher's): " + "; ".join(line(k, r) for k, r in images) + ".", ""]
    cost = d.get("cost")
    if isinstance(cost, dict) and cost:
        bf16 = any("bf16_speedup_sid" in v for v in cost.values())
        flags = next((v.get("cpu_bf16_instructions") for v in cost.values() if "cpu_bf16_instructions" in v), None)
        out += ["SiD iteration time as a multiple of one teacher-training step at the same batch "
                "(`python benchmarks/sid.py --only cost`; the floor is about 3)"
                + (", and the speed-up of `--precision bf16` (autocast) over fp32 on the same machine"
                   f" (CPU bfloat16 instructions: {', '.join(flags) if flags else 'none'})" if bf16 else "") + ":", "",
                _table(["data", "batch", "threads", "teacher step s", "SiD iteration s", "ratio"]
                       + (["bf16 speed-up, teacher step", "bf16 speed-up, SiD iteration"] if bf16 else []),
                       [[v.get("data", k), v.get("batch"), v.get("threads", "—"), _fmt(v.get("teacher_step_seconds")),
                         _fmt(v.get("sid_iteration_seconds")), _fmt(v.get("ratio"))]
                        + ([_fmt(v.get("bf16_speedup_teacher")), _fmt(v.get("bf16_speedup_sid"))] if bf16 else [])
                        for k, v in cost.items()]), ""]
    if cmds:
        scripts = []
        for part, c in cmds.items():  # the mixture runs may come from several commands (one per preset)
            extra = [r.get("benchmark_command") for r in (d.get("mixture") or {}).values()] if part == "mixture" else []
            scripts += [x for x in (extra or [c]) if x and x not in scripts]
        out += ["Benchmark scripts: " + ", ".join(_code(c) for c in scripts) + ".", ""]
    return out


def _image_runs(d: dict) -> list[tuple[str, dict]]:
    """The image runs of sid.json (a run named after its data, then its ablations), data by data."""
    runs = [(k, v) for k, v in d.items() if isinstance(v, dict) and "fd_key" in v and "student_sid_1nfe" in v]
    return sorted(runs, key=lambda kv: (kv[1].get("data", kv[0]), kv[0] != kv[1].get("data", kv[0]), kv[0]))


def _late_range(r: dict) -> str:
    """The range of the in-run log-likelihood over the last fifth of a mixture run (how settled it is)."""
    curve = r.get("curve") or []
    late = [c["log_likelihood"] for c in curve[len(curve) - max(len(curve) // 5, 1):]]
    if len(late) < 2:
        return ""
    return (f" (in-run, n = {r.get('curve_n')}, seed {r.get('curve_seed')}: {_fmt(min(late))} to {_fmt(max(late))} "
            f"over its last {len(late)} evaluations)")


def _from_init_line(results: Path, preset: str, sid_result: dict) -> str:
    """A sentence from sid_<preset>_reverse_kl_from_init.json in ``results``, if it exists."""
    d = _load(results / f"sid_{preset}_reverse_kl_from_init.json")
    teacher = (sid_result.get("teacher_exact_heun35") or {}).get("log_likelihood")
    if not isinstance(d, dict) or not d.get("curve") or teacher is None:
        return ""
    curve = d["curve"]
    first = next((c for c in curve if c["log_likelihood"] >= teacher), None)
    late = [c["log_likelihood"] for c in curve[len(curve) // 2:]]
    reach = (f"reaches the teacher's {_fmt(teacher)} at iteration {first['iteration']} ({_fmt(first['seconds'])} s)"
             if first else f"does not reach the teacher's {_fmt(teacher)}")
    sid_iters = (sid_result.get("distill") or {}).get("iterations")
    return (f" From SiD's own starting point ({d['init']}) and with its generator optimiser (Adam, lr "
            f"{d['lr']:g}, β = ({_fmt(d['betas'][0])}, {_fmt(d['betas'][1])}), batch {d['batch']}), the exact "
            f"reverse KL {reach} and ranges over [{_fmt(min(late))}, {_fmt(max(late))}] in the second half of its "
            f"{d['iterations']} iterations ({_code(d['command'])}, raw weights, n = {d['n_eval']})"
            + (f"; SiD ran {sid_iters} iterations." if sid_iters else "."))


def _diagnosis_lines(results: Path, preset: str, sid_result: dict) -> list[str]:
    """One paragraph from sid_<preset>_diagnosis.json in ``results``, if it exists."""
    d = _load(results / f"sid_{preset}_diagnosis.json")
    if not isinstance(d, dict) or "gradients_at_student" not in d:
        return []
    bands = [b for b in d["gradients_at_student"]["sid"] if isinstance(b["sigma_band"], list)]

    def cosines(which):
        return ", ".join(f"σ∈[{b['sigma_band'][0]}, {b['sigma_band'][1]}]: {_fmt(b[which]['cosine_to_reverse_kl'])}"
                         for b in bands)

    probe = d.get("reverse_kl_probe", {})
    curve = probe.get("curve") or []
    moved = (f" The same generator trained by the exact reverse KL instead (no fake score) moves "
             f"{_fmt(d['student']['log_likelihood'])} → {_fmt(curve[-1]['log_likelihood'])} nats in "
             f"{_fmt(probe.get('minutes'))} min" if curve else "")
    sid_curve = sid_result.get("curve") or []
    if curve and sid_curve:
        end_s = sid_curve[-1]["train_seconds"]
        start = next(c for c in sid_curve if c["train_seconds"] >= end_s - 60 * probe["minutes"])
        moved += (f"; SiD's own curve moved {_fmt(start['log_likelihood'])} → "
                  f"{_fmt(sid_curve[-1]['log_likelihood'])} in its last {_fmt(probe['minutes'])} min")
    if curve:
        moved += "."
    moved += _from_init_line(results, preset, sid_result)
    st, true = d["student"], d.get("true_samples", {})
    return [f"Why {preset} is not within 5% ({_code(d.get('command', ''))}, "
            f"`benchmarks/results/sid_{preset}_diagnosis.json`): the student's modes are "
            f"{_fmt(d['student_component_std_median'] / d['teacher_component_std'])}× as wide as the teacher's "
            f"(median std of a mixture fitted to it), and {_fmt(100 * st['frac_beyond_0.1'])}% of its samples lie "
            f"farther than 0.1 from every mode centre (true samples: {_fmt(100 * true.get('frac_beyond_0.1', float('nan')))}%). "
            f"Cosine between the mean SiD generator gradient (200 batches) and the exact reverse-KL gradient, "
            f"with the learned fake score — {cosines('learned_fake')} — and with an oracle fake score "
            f"(the exact denoiser of a mixture fitted to the student) — {cosines('oracle_fake')}. "
            f"The learned fake score's RMS error against that denoiser, next to the student-vs-teacher signal: "
            + ", ".join(f"σ={r['sigma']}: {_fmt(r['fake_error_rms'])} vs {_fmt(r['signal_rms'])}"
                        for r in d["fake_score_vs_fitted_student_denoiser"])
            + ". Per-batch signal-to-noise ratio of the SiD gradient with the learned fake: "
            + ", ".join(f"σ∈[{b['sigma_band'][0]}, {b['sigma_band'][1]}]: {_fmt(b['learned_fake']['per_batch_snr'])}"
                        for b in bands) + "." + moved, ""]


def progressive_section(name: str, d: dict) -> list[str]:
    meta, rows = d.get("meta") or {}, d.get("rows") or []
    if not rows:
        return []
    cmd = "python benchmarks/progressive.py" + (" --quick" if meta.get("mode") == "quick" else "")
    body = []
    for r in rows:
        pm = _primary(r)
        if pm is None:
            continue
        body.append([r.get("teacher"), r.get("method"), r.get("steps"), r.get("nfe"), f"{_label(pm[0])} = {_fmt(pm[1])}",
                     r.get("fd_floor"),
                     next((r[k] for k in r if k in ("mode_coverage", "precision") or k.startswith("precision_")), None),
                     r.get("train_kimg"), r.get("train_seconds"), r.get("sample_seconds"), r.get("n_samples")])
    return [f"### Step distillation ({name})", "",
            _table(["teacher", "method", "steps", "NFE", "metric", "FD floor", "modes / precision", "train kimg",
                    "train s", "sample s", "n"], body), "",
            f"Command: {_code(cmd)} ({meta.get('machine', '')}, {meta.get('seconds', 0):.0f} s in all). Train kimg "
            "and train s are those of the whole run that produced the student (all its stages; KD includes "
            "generating its teacher pairs); sample s is the time to draw the n samples.", ""]


def diffusers_section(d: dict) -> list[str]:
    """SiD on a diffusers UNet2DModel teacher trained with diffusers' own recipe (benchmarks/diffusers_teacher.py)."""
    fd, seeds = "fd_digits-featnet", [str(s) for s in d["seeds"]]
    t, s, tr, di = d["teacher_heun35"], d["student_sid_1nfe"], d["teacher_training"], d["distill"]
    ddim = d["teacher_ddim50_seed1"]
    rows = [["diffusers teacher (Heun, Karras over its ᾱ table)", t[seeds[0]]["nfe"]]
            + [t[k][fd] for k in seeds] + [d["fd_mean"]["teacher_heun35"], t[seeds[0]]["samples_per_second"], "", ""],
            ["diffusers teacher (DDIM at 50 of its own timesteps, trailing)", ddim["nfe"], ddim[fd]] + [""] * (len(seeds) - 1)
            + ["", ddim["samples_per_second"], "", ""],
            ["SiD student (the same UNet, new weights)", s[seeds[0]]["nfe"]] + [s[k][fd] for k in seeds]
            + [d["fd_mean"]["student_sid_1nfe"], s[seeds[0]]["samples_per_second"], di["kimg"], di["train_seconds"]]]
    return ["### SiD on a diffusers teacher", "",
            f"A `UNet2DModel` ({tr['params']:,} parameters) trained by diffusers' own DDPM recipe ({tr['scheduler']}, "
            f"ε-MSE, AdamW, `EMAModel`) for {tr['train_seconds'] / 60:.3g} minutes ({tr['kimg']:.0f} kimg) on digits, "
            f"saved with `save_pretrained`, then distilled from that folder with SiD for "
            f"{di['train_seconds'] / 60:.3g} minutes. FD (digits-featnet) at n = {d['n_samples']}, by noise seed:", "",
            _table(["model", "NFE"] + [f"FD seed {k}" for k in seeds] + ["mean", "samples/s", "train kimg", "train s"],
                   rows), "",
            f"Student at or below the teacher (Heun) at {d['student_at_or_below_teacher']} of {len(seeds)} seeds; "
            f"it samples {d['speedup_samples_per_second']:.1f}× as fast. Curve: `{d['curve_plot']}` (in-run, seed 0; "
            f"teacher there {_fmt(d['curve_teacher_seed0'])}). Command: {_code(d['command'])}"
            + (f" (evaluations re-measured by {_code(d['evaluated_by'])})" if d.get("evaluated_by") else "")
            + f"; the distillation: {_code(di['command'])}. Shipped for re-evaluation (`fewstep eval FOLDER --data "
            f"digits`): the teacher folder `{d['teacher_folder']}`, the student `{d['student_checkpoint']}`.", ""]


def _side_by_side(a: dict, b: dict, t: dict, runs: str = "the distillations") -> str:
    """The sentence naming two benchmark parts run side by side (``a``, ``b``: their results, each with its
    ``distill`` record), the part ``t`` that scored them, and the two training commands."""
    return (f"Commands: {_code(a['benchmark_command'])} and {_code(b['benchmark_command'])} side by side, then "
            f"{_code(t['benchmark_command'])}; {runs}: {_code(a['distill']['command'])} and "
            f"{_code(b['distill']['command'])}.")


def cd_section(d: dict) -> list[str]:
    """Consistency distillation beside SiD, same budget, one machine (benchmarks/cd.py)."""
    t, cd, sid = d.get("table"), d.get("digits"), d.get("digits-sid")
    if not (t and cd and sid):
        return []
    di, si = cd["distill"], sid["distill"]
    out = ["### Consistency distillation beside SiD", "",
            f"CD (the reference's N = 18 Karras points, Heun teacher steps and target EMA μ = 0.95; pseudo-Huber "
            f"distance, Adam lr 4e-4, batch 128: `benchmarks/cd.py` has the trials) and SiD (the "
            f"settings of the digits benchmark above) on the shipped digits teacher, run side by side on one "
            f"machine, one core each, {di['train_seconds'] / 60:.3g} and {si['train_seconds'] / 60:.3g} minutes of "
            f"training; every model scored on the same noise seeds, n = {t['n_samples']}:", "",
            t["table"], "", _cd_reading(t, di, si)]
    return out + [
            f"The CD student samples in one step or, with the multistep consistency sampler, in k "
            f"(`fewstep sample RUN --steps k`). FD curve of its one-step samples: `{t.get('curve_plot', '')}` "
            f"(in-run, seed 0). {_side_by_side(cd, sid, t)} The CD student is committed in "
            f"`{cd['student_checkpoint']}`.", ""] + cd_mixture_lines(d)


def _cd_reading(t: dict, di: dict, si: dict) -> str:
    """One sentence from the table's means: which student is ahead, and the images each saw."""
    means = {label: r["fd_mean"] for label, r in t["rows"].items()}
    cd_best = min((k for k in means if k.startswith("CD")), key=means.get)
    sid, teacher = means["SiD"], means["teacher (Heun)"]
    lead = "SiD's one-step student" if sid < means[cd_best] else f"CD's ({cd_best})"
    return (f"At equal wall-clock {lead} is ahead (mean FD {_fmt(min(sid, means[cd_best]))} against "
            f"{_fmt(max(sid, means[cd_best]))}; the teacher {_fmt(teacher)}), though CD saw {di['kimg'] / si['kimg']:.2g}× "
            f"the images: a CD iteration is one forward-backward of the student, one forward of the target and two "
            f"teacher evaluations, a SiD iteration three forward-backward passes. CD's best mean here is at "
            f"{cd_best.replace('CD', '').strip(' ()') or '1 step'}.")


def boot_section(d: dict) -> list[str]:
    """BOOT beside SiD, same budget, one machine (benchmarks/boot.py)."""
    t, bt, sid = d.get("table"), d.get("digits"), d.get("digits-sid")
    out = []
    if t and bt and sid:
        di, si = bt["distill"], sid["distill"]
        means = {label: r["fd_mean"] for label, r in t["rows"].items()}
        lead = "SiD" if means["SiD"] < means["BOOT"] else "BOOT"
        out = ["### BOOT beside SiD", "",
               f"BOOT (data-free; the student learns the teacher's own Heun path, 18 Karras steps, from each noise, "
               f"bootstrapped step by step: `benchmarks/boot.py` has the trials) and SiD (the settings of the digits "
               f"benchmark above) on the shipped digits teacher, run side by side on one machine, one core each, "
               f"{di['train_seconds'] / 60:.3g} and {si['train_seconds'] / 60:.3g} minutes of training; every model "
               f"scored on the same noise seeds, n = {t['n_samples']}; the last column is the RMS distance (per pixel, "
               f"in [-1, 1]) between a student's sample and the teacher's 35-NFE sample from the same noise, mean "
               f"over the seeds:", "", t["table"], "",
               f"At equal wall-clock {lead}'s one-step student is ahead (mean FD {_fmt(min(means['SiD'], means['BOOT']))} "
               f"against {_fmt(max(means['SiD'], means['BOOT']))}; the teacher {_fmt(means['teacher (Heun)'])}), "
               f"BOOT seeing {di['kimg'] / si['kimg']:.2g}× the images: a BOOT iteration is one student forward "
               f"(the target), two teacher evaluations and one student forward-backward, a SiD iteration three "
               f"forward-backward passes. BOOT's student follows the teacher's own path (its RMS to the teacher's "
               f"samples), SiD's only its distribution. For scale, the KD row is the student committed by "
               f"`benchmarks/reflow.py` (28 minutes of regression onto 20000 (noise, 35-NFE sample) pairs of the "
               f"same teacher, whose making is not in those minutes): the coupling BOOT learns without the pairs. "
               f"FD curves (in-run, seed 0): `{t.get('curve_plot', '')}`. "
               f"{_side_by_side(bt, sid, t)} The BOOT student is committed in `{bt['student_checkpoint']}`.", ""]
    m = d.get("mixture")
    if m:
        rows = [[label, r["nfe"], r["log_likelihood"], r["mode_coverage"], r["samples_per_second"]]
                for label, r in m["rows"].items()]
        di = m["distill"]
        out += ([] if out else ["### BOOT", ""]) + [
            f"On the exact mixture:{m['mixture']} teacher (BOOT from the shipped MLP as `--init`, {di['kimg']:.0f} kimg "
            f"in {di['train_seconds'] / 60:.3g} minutes; exact log-likelihood, n = {m['n_samples']}, noise seed "
            f"{m['seed']}; RMS distance between the student's and the teacher's samples from the same noise "
            f"{_fmt(m['rms_to_teacher'])}, the teacher's samples' std {_fmt(m['teacher_std'])}):", "",
            _table(["model", "NFE", "log-likelihood", "modes covered", "samples/s"], rows), "",
            f"Command: {_code(m['benchmark_command'])}; the distillation: {_code(di['command'])}.", ""]
    return out


def sds_section(d: dict) -> list[str]:
    """Score distillation sampling beside Diff-Instruct, same budget, one machine (benchmarks/sds.py)."""
    t, a, b = d.get("table"), d.get("digits-sds"), d.get("digits-di")
    out = []
    if t and a and b:
        da, db = a["distill"], b["distill"]
        r = t["rows"]
        out = ["### Score distillation sampling beside Diff-Instruct", "",
               f"SDS (`fewstep distill sds`) and Diff-Instruct, which differ only in the fake score (SDS's is the "
               f"sample itself), from the same teacher weights with the same σ distribution, optimiser, batch 128, "
               f"learning rate 1e-4 and EMA, run side by side on one machine, one core each, "
               f"{da['train_seconds'] / 60:.3g} and {db['train_seconds'] / 60:.3g} minutes of training; scored on the "
               f"same noise seeds, n = {t['n_samples']} (precision: the share of samples near the data; recall: the "
               f"share of the data near the samples):", "", t["table"], "",
               f"SDS's recall {_fmt(r['SDS']['recall_mean'])} against Diff-Instruct's "
               f"{_fmt(r['Diff-Instruct']['recall_mean'])} and the teacher's {_fmt(r['teacher (Heun)']['recall_mean'])}"
               f" (precision {_fmt(r['SDS']['precision_mean'])}, {_fmt(r['Diff-Instruct']['precision_mean'])}, "
               f"{_fmt(r['teacher (Heun)']['precision_mean'])}): without a fake score the generator "
               f"follows the teacher's density uphill. {_side_by_side(a, b, t)} Committed: "
               f"`{a['student_checkpoint']}`, `{b['student_checkpoint']}`.", ""]
    m, ms, mdi = d.get("mixture-table"), d.get("mixture-sds"), d.get("mixture-di")
    if m and ms and mdi:
        rows = [[label, r["nfe"], r["log_likelihood"], r["mode_coverage"], r["mmd_rbf"], r["sample_std"],
                 r["distance_from_data_mean"]] for label, r in m["rows"].items()]
        out += ([] if out else ["### Score distillation sampling beside Diff-Instruct", ""]) + [
            f"On the exact mixture:{m['mixture']} teacher (both from the shipped MLP as `--init`, "
            f"{ms['distill']['kimg']:.0f} and {mdi['distill']['kimg']:.0f} kimg in "
            f"{ms['distill']['train_seconds'] / 60:.3g} minutes each, side by side; n = {m['n_samples']}, noise seed "
            f"{m['seed']}; exact log-likelihood, MMD to exact samples, the samples' std per coordinate and their "
            f"mean distance from the data mean):", "",
            _table(["model", "NFE", "log-likelihood", "modes covered", "MMD (RBF)", "sample std",
                    "distance from the data mean"], rows), "",
            f"SDS's samples end {_fmt(m['rows']['SDS']['distance_from_data_mean'])} from the data mean on average, "
            f"the teacher's {_fmt(m['rows']['teacher (exact, Heun)']['distance_from_data_mean'])}: they bunch where "
            f"the noise-averaged density peaks, and the large noise levels see the modes as one blob around "
            f"their centre.", "",
            _side_by_side(ms, mdi, m), ""]
    return out


def cd_mixture_lines(d: dict, part: str = "mixture", label: str = "CD") -> list[str]:
    m = d.get(part)
    if not m:
        return []
    rows = [[name, r["nfe"], r["log_likelihood"], r["mode_coverage"], r["samples_per_second"]]
            for name, r in m["rows"].items()]
    di = m["distill"]
    return [f"On the exact mixture:{m['mixture']} teacher (CD from the shipped MLP as `--init`, {di['kimg']:.0f} kimg in "
            f"{di['train_seconds'] / 60:.3g} minutes; exact log-likelihood, n = {m['n_samples']}, noise seed "
            f"{m['seed']}):" if label == "CD" else
            f"On mixture:{m['mixture']} ({label} on its samples, from the shipped MLP as `--init`, {di['kimg']:.0f} "
            f"kimg in {di['train_seconds'] / 60:.3g} minutes, side by side with the CD run below; exact "
            f"log-likelihood, n = {m['n_samples']}, noise seed {m['seed']}):", "",
            _table(["model", "NFE", "log-likelihood", "modes covered", "samples/s"], rows), "",
            f"Command: {_code(m['benchmark_command'])}; the {'distillation' if label == 'CD' else 'training'}: "
            f"{_code(di['command'])}.", ""]


def _at_steps(label: str) -> tuple[str, str]:
    """("CD at 2 steps", label) from a table label such as "CD (2 steps)" (plain "CD" is one step)."""
    name, _, rest = label.partition(" (")
    return f"{name} at {rest.rstrip(')') or '1 step'}", label


def _swing(curve: list[dict], label: str, after_kimg: float = 150.0) -> str:
    """How far a run's in-run FD moves once it has levelled off: its range after ``after_kimg``."""
    key = next(k for k in curve[0] if k.startswith("fd_") and "floor" not in k)
    tail = [r[key] for r in curve if r["kimg"] >= after_kimg]
    return f"after {after_kimg:g} kimg {label}'s ranges over {_fmt(min(tail))}–{_fmt(max(tail))}" if tail else ""


def ct_section(d: dict) -> list[str]:
    """Consistency training beside consistency distillation, same budget, one machine (benchmarks/ct.py)."""
    t, ct, cd = d.get("table"), d.get("digits"), d.get("digits-cd")
    out = []
    if t and ct and cd:
        di, ci = ct["distill"], cd["distill"]
        means = {label: r["fd_mean"] for label, r in t["rows"].items()}
        best = {m: min((k for k in means if k.split(" ")[0] == m), key=means.get) for m in ("CT", "CD")}
        lead, other = (_at_steps(k) for k in sorted(best.values(), key=means.get))
        out = ["### Consistency training beside consistency distillation", "",
               f"CT (`fewstep distill ct` with its defaults: iCT's recipe, N doubling from 11 to 321 points over "
               f"the first 100 kimg, the discretised log-normal pair law, λ = 1/Δσ, pseudo-Huber, no target EMA) and "
               f"CD (the settings of the CD benchmark above), both from the shipped digits teacher's weights, run "
               f"side by side on one machine, one core each, {di['train_seconds'] / 60:.3g} and "
               f"{ci['train_seconds'] / 60:.3g} minutes of training; every model scored on the same noise seeds, "
               f"n = {t['n_samples']}:", "", t["table"], "",
               f"Best of each at equal wall-clock: {lead[0]} (mean FD {_fmt(means[lead[1]])}) against {other[0]} "
               f"({_fmt(means[other[1]])}); the teacher {_fmt(means['teacher (Heun)'])}. CT saw "
               f"{di['kimg'] / ci['kimg']:.2g}× CD's images: a CT iteration is one forward-backward of the student "
               f"and one forward of the target, with no teacher evaluation (CD's Heun step takes two). "
               f"FD against minutes of training (in-run, one step, seed 0): `{t.get('curve_plot', '')}`; "
               f"{_swing(ct['curve'], 'CT')} and {_swing(cd['curve'], 'CD')}. "
               f"{_side_by_side(ct, cd, t, 'the runs')} The CT student is committed in `{ct['student_checkpoint']}`.",
               ""]
    if d.get("mixture"):
        out += ([] if out else ["### Consistency training", ""]) + cd_mixture_lines(d, "mixture", "CT") \
            + cd_mixture_lines(d, "mixture-cd", "CD")
    return out


def reflow_section(d: dict) -> list[str]:
    """Reflow beside KD on the same teacher pairs, same budget, one machine (benchmarks/reflow.py)."""
    t, rf, kd, pairs, fk = d.get("table"), d.get("digits"), d.get("digits-kd"), d.get("pairs"), d.get("digits-rf-kd")
    out = []
    if t and rf and kd and pairs:
        ri, ki = rf["distill"], kd["distill"]
        st = t["straightness"]
        out = ["### Rectified flow (reflow) beside knowledge distillation", "",
               f"Reflow (a 2-rectified flow: the teacher's network trained on the straight lines between the "
               f"noise and the sample of each teacher pair, sampled with Euler steps on the flow's uniform time "
               f"grid) and KD (a one-step generator regressed on the same pairs) on the shipped digits teacher: "
               f"{pairs['n']} pairs of its Heun sampler (35 NFE) made once ({pairs['seconds'] / 60:.2g} minutes on "
               f"{pairs['threads']} cores), then both trained side by side, one core each, "
               f"{ri['train_seconds'] / 60:.3g} and {ki['train_seconds'] / 60:.3g} minutes; every model scored on the "
               f"same noise seeds, n = {t['n_samples']}:", "", t["table"], "",
               _reflow_reading(t, {k: d[k]["curve"] for k in ("digits-kd", "digits-rf-kd") if k in d}
                               if fk else None), "",
               f"Straightness of the sampling trajectories ({t['straightness_protocol']}; mean squared gap between "
               f"the velocity and its chord's per dimension, relative to the chord's): teacher "
               f"{_fmt(st['teacher']['straightness'])} (relative {_fmt(st['teacher']['relative'])}), 2-rectified flow "
               f"{_fmt(st['2-rectified flow']['straightness'])} ({_fmt(st['2-rectified flow']['relative'])}).", "",
               f"Commands: {_code(pairs['benchmark_command'])}, then {_code(rf['benchmark_command'])} and "
               f"{_code(kd['benchmark_command'])} side by side, "
               + (f"then {_code(fk['benchmark_command'])} ({fk['pairs']['n']} pairs of the flow's Euler sampler at "
                  f"{fk['pairs']['recipe']['steps']} steps, {fk['pairs']['seconds']:.0f} s), " if fk else "")
               + f"then {_code(t['benchmark_command'])}; the distillations: {_code(ri['command'])}, "
               f"{_code(ki['command'])}" + (f" and {_code(fk['distill']['command'])}" if fk else "") + ". FD curves "
               f"(in-run, seed 0): `{t.get('curve_plot', '')}`. Committed: "
               + ", ".join(f"`{r['student_checkpoint']}`" for r in (rf, kd, fk) if r) + ".", ""]
    m = d.get("mixture")
    if m:
        rows = [[label, r["nfe"], r["log_likelihood"], r["mode_coverage"]] for label, r in m["rows"].items()]
        di, st = m["distill"], m["straightness"]
        out += [f"On the exact mixture:{m['mixture']} teacher (reflow from the shipped MLP as `--init`, "
                f"{di['kimg']:.0f} kimg in {di['train_seconds'] / 60:.3g} minutes; exact log-likelihood, n = "
                f"{m['n_samples']}, noise seed {m['seed']}; straightness teacher "
                f"{_fmt(st['teacher']['straightness'])}, 2-rectified flow {_fmt(st['2-rectified flow']['straightness'])}):",
                "", _table(["model", "NFE", "log-likelihood", "modes covered"], rows), "",
                f"Command: {_code(m['benchmark_command'])}; the distillation: {_code(di['command'])}.", ""]
    return out


def _reflow_reading(t: dict, curves: dict | None = None) -> str:
    """Sentences from the table's means: the flow against the teacher's own Euler steps, and against KD at one step."""
    m = {label: r["fd_mean"] for label, r in t["rows"].items()}
    flows = sorted((int(k.rsplit(", ", 1)[1].rstrip(")")), v) for k, v in m.items() if k.startswith("2-rectified"))
    teacher = {int(k.rsplit(", ", 1)[1].rstrip(")")): v for k, v in m.items() if k.startswith("teacher (Euler")}
    k, best = min(flows, key=lambda kv: kv[1])
    out = (f"At {k} Euler step{'s' if k > 1 else ''} the 2-rectified flow's mean FD is {_fmt(best)}, against "
           f"{_fmt(teacher[k])} for the teacher with the same sampler and steps and {_fmt(m['teacher (Heun)'])} for the "
           f"teacher at 35 NFE; at one step it is {_fmt(flows[0][1])} against KD's {_fmt(m['KD'])} on the same pairs.")
    if "KD of the 2-rectified flow" in m:
        out += (f" KD of the 2-rectified flow (on its own pairs) reaches {_fmt(m['KD of the 2-rectified flow'])} at one "
                f"step, after the flow's training and its own (the same budget each).")
        if curves:
            first = {k: next(r for r in c if r.get("kimg", 0) > 0) for k, c in curves.items()}
            key = next(k for k in first["digits-kd"] if k.startswith("fd_") and "floor" not in k)
            out += (f" It starts from the flow's network, so the one-step map it learns is nearly there: its first "
                    f"in-run FD (seed 0, at {first['digits-rf-kd']['kimg']:.0f} kimg) is "
                    f"{_fmt(first['digits-rf-kd'][key])}, where KD on the teacher's pairs starts at "
                    f"{_fmt(first['digits-kd'][key])}")
            level = next((r["kimg"] for r in curves["digits-kd"] if r[key] <= first["digits-rf-kd"][key]), None)
            out += (f" and first comes level at {level:.0f} kimg." if level is not None
                    else " and never comes level in its run.")
    return out


def guidance_section(d: dict) -> list[str]:
    """Guidance distillation of a class-conditional digits teacher (benchmarks/guidance.py)."""
    te, di, c = d.get("teacher"), d.get("distill"), d.get("compare")
    if not (te and di and c):
        return []
    rows = c["rows"]
    guided = [k for k in rows if float(k) != 1.0]
    fd_gap = max(abs(rows[k]["student"]["fd_mean"] - rows[k]["teacher_cfg"]["fd_mean"]) for k in guided)
    speed = [rows[k]["speedup"] for k in guided]
    return ["### Guidance distillation", "",
            f"A class-conditional digits teacher (trained like the shipped one, with label dropout 0.1: "
            f"{te['kimg']:.0f} kimg in {te['train_seconds'] / 60:.3g} minutes), and its guidance-distilled student "
            f"(the teacher's network with a guidance input, trained for every κ in [1, 5]: {di['kimg']:.0f} kimg in "
            f"{di['train_seconds'] / 60:.3g} minutes). Both sampled with Heun, 18 steps; the teacher with "
            f"classifier-free guidance (two network evaluations per step), the student with κ as an input (one); "
            f"FD and label accuracy (the feature classifier's class = the conditioning label) are means over noise "
            f"seeds {', '.join(map(str, c['seeds']))} at n = {c['n_samples']}; the RMS distance is per pixel in "
            f"[-1, 1], between the two models' samples from the same noise and labels (seed 1):", "", c["table"], "",
            f"At κ > 1 the student's FD is within {_fmt(fd_gap)} of the teacher's at every κ, and it samples "
            f"{min(speed):.2f}–{max(speed):.2f}× as fast (half the network evaluations)." + _guidance_edge(rows), "",
            f"Commands: {_code(te['benchmark_command'])}, {_code(di['benchmark_command'])}, "
            f"{_code(c['benchmark_command'])}; the training runs: {_code(te['command'])} and {_code(di['command'])}. "
            f"Committed: `{te['checkpoint']}`, `{di['checkpoint']}` (`fewstep eval FOLDER --guidance κ`).", ""] \
        + _guidance_steps_lines(d)


def _guidance_edge(rows: dict) -> str:
    """A sentence on κ = 1 (the edge of the learnt range) if the student strays most there."""
    rms = {k: r["rms_student_vs_teacher_seed1"] for k, r in rows.items()}
    if "1" not in rms or len(rms) < 3 or rms["1"] <= max(v for k, v in rms.items() if k != "1"):
        return ""
    r = rows["1"]
    return (f" The student is furthest from its teacher at κ = 1, the edge of the range it learnt (RMS "
            f"{rms['1']:.3g}, against {min(rms.values()):.3g}–{max(v for k, v in rms.items() if k != '1'):.3g} "
            f"inside it): there it is not the teacher's conditional model but closer to a guided one (FD "
            f"{_fmt(r['student']['fd_mean'])}, label accuracy {r['student']['label_accuracy_mean']:.3f}, against the "
            f"teacher's {_fmt(r['teacher_cfg']['fd_mean'])} and {r['teacher_cfg']['label_accuracy_mean']:.3f}): an edge "
            f"of the range gets the fewest κ draws near it, so train on a range wider than the κ you will sample at.")


def _guidance_steps_reading(rows: dict) -> str:
    """The fewest-step progressive student against the teacher's CFG at the same steps, per κ."""
    out = []
    for kappa in sorted({k.rsplit("κ=", 1)[1].rstrip(")") for k in rows}, key=float):
        steps = min(int(k.split(", ")[1].split()[0]) for k in rows
                    if k.startswith("progressive student") and k.endswith(f"(κ={kappa})"))
        p = rows[f"progressive student, {steps} steps (κ={kappa})"]
        t = rows[f"teacher CFG, DDIM {steps} steps (κ={kappa})"]
        h = rows[f"teacher CFG, Heun 18 steps (κ={kappa})"]
        out.append(f"at κ = {kappa} the {steps}-step student ({p['nfe']} NFE) reaches FD {_fmt(p['fd_mean'])} where the "
                   f"teacher's CFG with DDIM at {steps} steps ({t['nfe']} NFE) gets {_fmt(t['fd_mean'])} and with Heun "
                   f"at {h['nfe']} NFE {_fmt(h['fd_mean'])}")
    return "The two stages together: " + "; ".join(out) + "."


def _guidance_steps_lines(d: dict) -> list[str]:
    """Stage two (progressive distillation of the guidance student), if benchmarked."""
    st, sc = d.get("steps"), d.get("steps-compare")
    if not (st and sc):
        return []
    return [f"Stage two, progressive distillation of the guidance student (16 → 8 → 4 → 2 DDIM steps on the "
            f"clipped cosine grid, κ drawn from [1, 5] per sample: {st['kimg']:.0f} kimg in "
            f"{st['train_seconds'] / 60:.3g} minutes), against the teacher's CFG and the guidance student with DDIM "
            f"on the same grid (FD and label accuracy: means over noise seeds "
            f"{', '.join(map(str, sc['seeds']))}, n = {sc['n_samples']}):", "", sc["table"], "",
            _guidance_steps_reading(sc["rows"]), "",
            f"Commands: {_code(st['benchmark_command'])}, {_code(sc['benchmark_command'])}; the distillation: "
            f"{_code(st['command'])}. Committed: " + ", ".join(f"`{v}`" for v in st["checkpoints"].values()) + ".", ""]


def bench_section(name: str, d: dict) -> list[str]:
    from fewstep.eval.tables import columns

    meta, rows = d.get("meta") or {}, d.get("rows") or []
    if not rows:
        return []
    cols = [c for c in columns(rows[0]) if any(c[1] in r for r in rows)]
    body = [[r.get("label"), r.get("nfe")] + [r.get(k) for _, k in cols] + [r.get("train_kimg"), r.get("train_seconds")]
            for r in rows]
    budget = (f"{meta['budget_minutes']:g} min" if meta.get("budget_minutes") else f"{meta.get('budget_kimg')} kimg")
    out = [f"### fewstep bench: {meta.get('teacher', name)} ({budget} per method, n = {meta.get('eval_n')})", "",
           _table(["model", "NFE"] + [h for h, _ in cols] + ["train kimg", "train s"], body), "",
           f"Command: {_code(meta.get('command', ''))}.", ""]
    missing = {**{k: v.get("reason", "") for k, v in (d.get("methods") or {}).items() if v.get("status") != "ok"},
               **(d.get("absent") or {})}
    if missing:
        out += ["Not compared: " + "; ".join(f"{k} ({v})" for k, v in missing.items()) + ".", ""]
    return out


def render(results: Path) -> str:
    """The Markdown between the markers, from the files in ``results``."""
    lines = ["Generated by `python benchmarks/make_readme_results.py` from `benchmarks/results/`; "
             "every number stands beside the command that produced it.", ""]
    notes, found = [], False
    files = sorted(results.glob("*.json")) + sorted(results.glob("*/results.json")) if results.is_dir() else []
    order = {"teachers.json": 0, "sid.json": 1}
    for p in sorted(files, key=lambda p: (order.get(p.name, 2), str(p))):
        d = _load(p)
        rel = p.relative_to(results)
        if isinstance(d, Exception) or not isinstance(d, dict):
            notes.append(f"- `{rel}` skipped: unreadable ({d})")
            continue
        try:
            if d.get("format") == "fewstep.bench":
                part = bench_section(str(rel.parent if rel.name == "results.json" else rel.stem), d)
            elif p.name == "teachers.json":
                part = teachers_section(d)
            elif p.name == "sid.json":
                part = sid_section(d, results)
            elif p.name == "diffusers_teacher.json":
                part = diffusers_section(d)
            elif p.name == "cd.json":
                part = cd_section(d)
            elif p.name == "reflow.json":
                part = reflow_section(d)
            elif p.name == "guidance.json":
                part = guidance_section(d)
            elif p.name == "boot.json":
                part = boot_section(d)
            elif p.name == "ct.json":
                part = ct_section(d)
            elif p.name == "sds.json":
                part = sds_section(d)
            elif p.name.startswith("progressive"):
                if p.stem == "progressive-quick" and (results / "progressive.json").is_file():
                    continue  # the smoke-test settings only when the full run is absent
                part = progressive_section(p.stem, d)
            else:
                continue
        except Exception as e:  # noqa: BLE001 - one malformed file must not lose the others
            notes.append(f"- `{rel}` skipped: {type(e).__name__}: {e}")
            continue
        if part:
            found = True
            lines += part
    if not found:
        lines += ["No benchmark results yet: run the scripts in `benchmarks/` (or `fewstep bench --out "
                  "benchmarks/results/NAME ...`), then this script.", ""]
    if notes:
        lines += ["Files skipped:", ""] + notes + [""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, block: str) -> bool:
    """Replace the text between the markers (adding them if absent); True if the file changed."""
    text = readme.read_text() if readme.is_file() else ""
    new_block = f"{START}\n{block}{END}"
    if START in text and END in text and text.index(START) < text.index(END):
        a, b = text.index(START), text.index(END) + len(END)
        new = text[:a] + new_block + text[b:]
    else:
        new = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") + new_block + "\n"
    if new == text:
        return False
    readme.write_text(new)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help="README to update")
    ap.add_argument("--check", action="store_true", help="only check that the README is up to date")
    args = ap.parse_args(argv)
    block = render(Path(args.results))
    readme = Path(args.readme)
    if args.check:
        text = readme.read_text() if readme.is_file() else ""
        ok = f"{START}\n{block}{END}" in text
        print("README results are up to date" if ok else "README results are out of date: run "
              "python benchmarks/make_readme_results.py")
        return 0 if ok else 1
    changed = update_readme(readme, block)
    print(f"{'updated' if changed else 'unchanged'}: {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
