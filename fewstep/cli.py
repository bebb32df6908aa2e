"""The ``fewstep`` command: train teachers, distil them, sample, evaluate.

    fewstep teacher --data mnist5k --out runs/teacher
    fewstep distill sid --teacher runs/teacher --out runs/sid
    fewstep sample runs/sid --n 64 --out sid.png
    fewstep eval runs/sid --n 1000
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from . import __version__
from .errors import FewstepError


def _threads() -> None:
    n = os.environ.get("FEWSTEP_THREADS")
    if n:
        import torch

        if not n.strip().isdigit() or int(n) < 1:
            raise FewstepError(f"FEWSTEP_THREADS must be a whole number of threads >= 1, got {n!r}")
        torch.set_num_threads(int(n))


# ---- shared pieces --------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    from .cli_args import add_dataclass_args
    from .training.loop import TrainConfig

    add_dataclass_args(p, TrainConfig, "training loop", defaults=defaults)


def _command_line() -> str:
    return "fewstep " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _check_run_compatible(out: Path, run_config: dict) -> None:
    """A run folder with a different run in it is never silently overwritten."""
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        return
    old = json.loads(cfg_path.read_text())
    for key in ("method", "method_config", "teacher", "init", "data"):
        if key in old and key in run_config and old[key] != run_config[key]:
            raise FewstepError(
                f"{out} already holds a run with a different {key} ({old[key]!r} vs {run_config[key]!r}); "
                "use another --out, or delete the folder to start over")


def _train(method, train_cfg, out: Path, run_config: dict, *, dataset=None, evaluator=None) -> dict:
    from .training.loop import Trainer

    _check_run_compatible(out, run_config)
    trainer = Trainer(method, train_cfg, str(out), dataset=dataset, evaluator=evaluator, run_config=run_config)
    summary = trainer.run_training()
    if trainer.rank == 0:
        print(f"run folder: {out}   model: {out / 'model'}   "
              f"({summary['kimg']:.1f} kimg, {summary['train_seconds']:.0f}s)", file=sys.stderr)
        if summary.get("final_metrics"):
            print(json.dumps(summary["final_metrics"], indent=2))
    return summary


def _evaluator(args, data_name: str | None):
    n = getattr(args, "eval_n", None)
    if n is not None and n < 1:
        raise FewstepError(f"--eval-n must be >= 1 (samples per evaluation), got {n}")
    if n is None:  # options that only matter with an evaluation are not silently dropped
        if (getattr(args, "eval_every_kimg", None) or 0) > 0:
            raise FewstepError("--eval-every-kimg needs --eval-n N (the samples per evaluation)")
        if getattr(args, "feature_net", None):
            raise FewstepError("--feature-net is for the in-run evaluation: give --eval-n N too")
    if not n or getattr(args, "eval_every_kimg", None) in (None,) and not getattr(args, "final_eval", True):
        return None
    from .eval.runner import make_evaluator

    return make_evaluator(data_name, n=n, feature_net=getattr(args, "feature_net", None))


# ---- fewstep teacher --------------------------------------------------------------------------------
def cmd_teacher(args) -> int:
    from .cli_args import dataclass_from_args
    from .data import load_dataset
    from .methods.base import DataInfo
    from .teachers.training import EDMTeacher, TeacherConfig
    from .training.loop import TrainConfig

    _threads()
    import torch

    train_cfg = dataclass_from_args(TrainConfig, args)
    ds = load_dataset(args.data, split="train")
    base = {}
    if args.net is None:
        base["net"] = _preset_for(ds)
    elif isinstance(args.net, dict) and "name" not in args.net:  # a partial --net changes the data's preset
        args.net = {**_preset_for(ds), **args.net}
    cfg = dataclass_from_args(TeacherConfig, args, base)
    num_classes = ds.num_classes if args.conditional else 0
    if args.conditional and ds.num_classes == 0:
        raise FewstepError(f"--conditional needs a labelled dataset; {ds.name} has no labels")
    cfg.net = {**cfg.net, "num_classes": num_classes}
    info = DataInfo(kind=ds.kind, sample_shape=tuple(ds.sample_shape), num_classes=num_classes, name=ds.name)
    torch.manual_seed(train_cfg.seed)
    method = EDMTeacher(cfg, info)
    if not args.conditional:
        ds.labels = None
    from .config import to_dict

    run_config = {"method": "teacher", "method_config": to_dict(cfg), "data": args.data,
                  "command": _command_line(), "fewstep_version": __version__}
    _train(method, train_cfg, Path(args.out), run_config, dataset=ds, evaluator=_evaluator(args, ds.name))
    return 0


def _preset_for(ds) -> dict:
    from .nets import preset_net

    return preset_net(ds)


# ---- fewstep distill --------------------------------------------------------------------------------
def cmd_distill(args) -> int:
    from .cli_args import dataclass_from_args
    from .config import to_dict
    from .methods.base import get_method
    from .model import load_model
    from .training.loop import TrainConfig

    _threads()
    import torch

    from .teachers.diffusers_adapter import DATA_NAME as DIFFUSERS_DATA

    cls = get_method(args.method)
    train_cfg = dataclass_from_args(TrainConfig, args, getattr(cls, "train_defaults", None))
    cfg = dataclass_from_args(cls.Config, args)
    from .training.distributed import process_device

    train_cfg.device = str(process_device(train_cfg.device))  # under torchrun: this process's GPU
    teacher = load_model(args.teacher, device=train_cfg.device)
    data_name = args.data or teacher.data_info.name
    if data_name == DIFFUSERS_DATA and (cls.uses_data or getattr(args, "eval_n", None)):
        need = f"{args.method} trains on data" if cls.uses_data else "--eval-n compares with real images"
        raise FewstepError(f"{need}, and a diffusers teacher names no dataset: pass the images it was trained "
                           "on with --data (a built-in name, a .npy/.npz file or an image folder)")
    from .data import load_dataset

    dataset = None
    if args.data:  # data of another shape than the teacher's fails now, not at the first evaluation
        dataset = load_dataset(args.data, split="train")
        shape = tuple(dataset.x.shape[1:])
        if shape != tuple(teacher.data_info.sample_shape):
            what = "the diffusers teacher" if teacher.data_info.name == DIFFUSERS_DATA else "the teacher"
            raise FewstepError(f"--data {args.data} holds samples of shape {list(shape)} but {what} makes "
                               f"{list(teacher.data_info.sample_shape)}: pass the data it was trained on")
    if teacher.data_info.name == DIFFUSERS_DATA and args.data:  # the student then names the data it was given
        from .methods.base import DataInfo

        teacher.config["data"] = {**teacher.config["data"], "name": args.data}
        teacher.data_info = DataInfo.from_dict(teacher.config["data"])
    if cls.uses_data:
        if not data_name:
            raise FewstepError(f"{args.method} trains on data: pass --data NAME_OR_PATH")
        dataset = load_dataset(data_name, split="train") if dataset is None else dataset
        if teacher.data_info.num_classes == 0:
            dataset.labels = None
    else:
        dataset = None  # data-free methods get no batches
    init = load_model(args.init, device=train_cfg.device) if getattr(args, "init", None) else None
    torch.manual_seed(train_cfg.seed)
    method = cls.create(cfg, teacher=teacher, dataset=dataset, init=init)
    run_config = {"method": cls.name, "method_config": to_dict(cfg), "teacher": str(args.teacher),
                  "init": str(args.init) if getattr(args, "init", None) else None,
                  "data": data_name, "command": _command_line(), "fewstep_version": __version__}
    _train(method, train_cfg, Path(args.out), run_config, dataset=dataset,
           evaluator=_evaluator(args, data_name))
    return 0


# ---- fewstep export ----------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from .model import load_model
    from .teachers.diffusers_adapter import save_diffusers

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FewstepError(f"--out {out} exists and is not an empty folder: export writes a new folder (a run "
                           "folder holding an export would then be read as the export, not as its model)")
    model = load_model(args.checkpoint)
    out = save_diffusers(model, out)
    print(json.dumps({"out": str(out), "format": args.format, "type": model.config.get("type"),
                      "sampling": model.sampling}))
    return 0


# ---- fewstep sample ----------------------------------------------------------------------------------
def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .model import load_model

    _threads()
    model = load_model(args.checkpoint, device=args.device)
    labels = None
    if args.labels is not None:
        k = model.data_info.num_classes
        if k == 0:
            raise FewstepError("--labels given but the model is unconditional")
        try:
            vals = [int(v) for v in args.labels.split(",")]
        except ValueError:
            raise FewstepError(f"--labels must be comma-separated class indices such as 0,3,7; got {args.labels!r}") from None
        if any(v < 0 or v >= k for v in vals):
            raise FewstepError(f"--labels must be in 0..{k - 1}")
        labels = torch.tensor(vals * (args.n // len(vals) + 1))[: args.n].to(args.device)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".npy", ".npz"):  # before sampling, not after
        raise FewstepError(f"--out must end in .png, .jpg, .npy or .npz, got {out.name}")
    t0 = time.perf_counter()
    res = model.sample(args.n, seed=args.seed, sampler=args.sampler, steps=args.steps, schedule=args.schedule,
                       labels=labels, guidance=args.guidance, batch_size=args.batch_size)
    dt = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    x = res.x.detach().cpu()
    suffix = out.suffix.lower()
    if suffix == ".npy":
        with open(out, "wb") as f:  # a file object: numpy would append ".npy" to "S.NPY"
            np.save(f, x.numpy())
    elif suffix == ".npz":
        lab = labels if labels is not None else (
            torch.arange(args.n) % model.data_info.num_classes if model.data_info.num_classes else None)
        with open(out, "wb") as f:
            np.savez(f, x=x.numpy(), **({"labels": lab.cpu().numpy()} if lab is not None else {}))
    else:  # .png / .jpg / .jpeg (checked before sampling)
        from .eval.pictures import save_samples_picture

        save_samples_picture(x, out, model.data_info.kind, title=f"NFE {res.nfe}")
    print(json.dumps({"out": str(out), "n": args.n, "nfe": res.nfe, "seconds": round(dt, 3),
                      "samples_per_second": round(args.n / dt, 2)}))
    return 0


# ---- fewstep eval -------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .eval.runner import evaluate_model, evaluate_model_seeds
    from .model import load_model

    _threads()
    from .eval.inception import resolve_weights_path

    inception = resolve_weights_path(args.inception)  # a named but missing file fails here, before sampling
    model = load_model(args.checkpoint, device=args.device)
    kw = dict(n=args.n, sampler=args.sampler, steps=args.steps, schedule=args.schedule, data=args.data,
              guidance=args.guidance, batch_size=args.batch_size, inception=str(inception) if inception else None,
              feature_net=args.feature_net)
    if args.seeds:
        result = evaluate_model_seeds(model, args.seeds, **kw)
    else:
        result = evaluate_model(model, seed=args.seed, **kw)
    if args.straightness:
        from .eval.straightness import model_straightness

        result["straightness"] = model_straightness(model, args.n, seed=args.seed, steps=args.straightness)
    result["checkpoint"] = str(args.checkpoint)
    text = json.dumps(result, indent=2)
    if args.json:
        from .training.checkpoint import atomic_write_text

        atomic_write_text(Path(args.json), text + "\n")
    print(text)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    _threads()
    run_demo(args.out, data=args.data, minutes=args.minutes, n_eval=args.n, seed=args.seed)
    return 0


def cmd_datasets(args) -> int:
    from .data import DATASETS

    for name, desc in DATASETS.items():
        print(f"{name:14s} {desc}")
    from .diffusion.mixture import PRESETS

    for name, desc in PRESETS.items():
        print(f"mixture:{name:6s} exact Gaussian-mixture teacher: {desc}")
    return 0


# ---- parser -----------------------------------------------------------------------------------------------
def _sampling_args(p, with_out: bool = True) -> None:
    from .diffusion.samplers import SAMPLERS

    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=sorted(SAMPLERS) + ["one-step"], default=None,
                   help="sampler (default: the checkpoint's own recipe, e.g. heun for teachers, one-step for SiD)")
    g.add_argument("--steps", type=int, default=None, help="sampler steps (heun: NFE = 2·steps − 1)")
    g.add_argument("--schedule", default=None, help="σ schedule: karras, vp-uniform, cosine, exponential, "
                   "consistency or flow (default: the checkpoint's own recipe)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale κ (conditional models; 1 = none): two network passes per step, one on a guidance-distilled model")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    g.add_argument("--batch-size", type=int, default=500, help="samples per forward pass")
    g.add_argument("--device", default="cpu", help="cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    from .cli_args import add_dataclass_args
    from .methods.base import METHODS, get_method
    from .teachers.training import TeacherConfig

    get_method("teacher")  # registers all methods
    parser = argparse.ArgumentParser(
        prog="fewstep", description="Distil multi-step diffusion models into one- or few-step generators.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("teacher", help="train a diffusion teacher (EDM loss) on a dataset",
                       description="Train a teacher denoiser with the EDM loss; writes a run folder.")
    p.add_argument("--data", required=True, help="dataset name (see `fewstep datasets`) or a .npy/.npz/image folder")
    p.add_argument("--out", required=True, help="run folder (re-running the same command resumes it)")
    p.add_argument("--conditional", action="store_true", help="class-conditional teacher (labelled data)")
    p.add_argument("--eval-n", type=int, default=None, help="samples per in-run/final evaluation (default: none)")
    p.add_argument("--feature-net", default=None, metavar="FILE",
                   help="feature net for the in-run evaluation of images fewstep ships none for (your own "
                        "labelled images: python -m fewstep.eval.feature_net --dataset PATH --out FILE)")
    add_dataclass_args(p, TeacherConfig, "teacher")
    _train_args(p)
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("distill", help="distil a teacher with a method (sid, dmd, progressive, ...)",
                       description="Distil a teacher into a one- or few-step student; writes a run folder.")
    msub = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name, cls in sorted(METHODS.items()):
        if name == "teacher":
            continue
        mp = msub.add_parser(name, help=cls.summary, description=(cls.__doc__ or "").strip(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        mp.add_argument("--teacher", required=True,
                        help="teacher: run folder, model folder, shipped:NAME, mixture:PRESET, or a diffusers folder (a UNet2DModel saved with its scheduler)")
        mp.add_argument("--out", required=True, help="run folder (re-running the same command resumes it)")
        mp.add_argument("--data", default=None, help="dataset for data-based methods and evaluation "
                                                     "(default: the teacher's dataset)")
        mp.add_argument("--init", default=None, help="initialise the student from this model instead of the teacher "
                                                     "(needed for exact mixture teachers, which have no weights)")
        mp.add_argument("--eval-n", type=int, default=None, help="samples per in-run/final evaluation (default: none)")
        mp.add_argument("--feature-net", default=None, metavar="FILE",
                        help="feature net for the in-run evaluation of images fewstep ships none for (your own "
                             "labelled images: python -m fewstep.eval.feature_net --dataset PATH --out FILE)")
        add_dataclass_args(mp, cls.Config, name)
        _train_args(mp, getattr(cls, "train_defaults", None))  # --help shows the defaults this method runs with
        mp.set_defaults(func=cmd_distill)

    p = sub.add_parser("sample", help="sample a checkpoint to a picture or an array file")
    p.add_argument("checkpoint", help="run folder, model folder, shipped:NAME, mixture:PRESET or a diffusers folder")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True, help="output: .png (grid / scatter), .npy or .npz (model space)")
    p.add_argument("--labels", default=None, help="comma-separated class labels to cycle through (conditional models)")
    _sampling_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="evaluate a checkpoint: metrics as JSON with NFE and sample count")
    p.add_argument("checkpoint", help="run folder, model folder, shipped:NAME, mixture:PRESET or a diffusers folder")
    p.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--data", default=None, help="reference dataset (default: the model's own)")
    p.add_argument("--json", default=None, help="also write the metrics to this file")
    p.add_argument("--inception", default=None, help="standard FID Inception weights file (pt_inception-2015-12-05, "
                                                     "or $FEWSTEP_INCEPTION): adds Inception FID for images")
    p.add_argument("--feature-net", default=None, metavar="FILE",
                   help="feature net for FD/KID/precision/recall (default: the one shipped for the data); for your "
                        "own labelled images train one with `python -m fewstep.eval.feature_net --dataset PATH --out FILE`")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="evaluate at each of these noise seeds (instead of --seed) and report every metric's "
                        "mean and std over them: an FD at n = 1000 moves between seeds as much as between "
                        "training settings")
    p.add_argument("--straightness", type=int, default=0, metavar="STEPS",
                   help="also measure how straight the model's sampling trajectories are (Liu et al. 2022: the mean "
                        "squared gap between the flow velocity and its chord's, 0 for straight lines), along STEPS "
                        "Euler steps (e.g. 100) from the --n noises of --seed")
    _sampling_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a checkpoint in diffusers' format (models around a diffusers UNet)",
                       description="Write a teacher or student built on a diffusers UNet2DModel (one loaded from a "
                                   "diffusers folder, or distilled from one) as a DDPMPipeline folder: the UNet, a "
                                   "DDPMScheduler on its ᾱ table and fewstep.json (the sampling recipe; for a one-step "
                                   "student, the σ and timestep to call the UNet at). fewstep reads it back as the "
                                   "same model.")
    p.add_argument("checkpoint", help="run folder, model folder or diffusers folder")
    p.add_argument("--out", required=True, help="folder to write (diffusers save_pretrained layout)")
    p.add_argument("--format", choices=["diffusers"], default="diffusers", help="target format (default diffusers)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="distil a shipped teacher with SiD for a few minutes and compare",
                       description="The main job in one command: SiD-distil the shipped teacher, then show "
                                   "teacher and one-step student side by side with metrics, NFE and speed.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--data", default="digits", help="which shipped teacher: digits (default; fits a few CPU minutes), mnist5k, or the 2-D point sets 8gaussians and 25gaussians")
    p.add_argument("--minutes", type=float, default=4.0, help="SiD wall-clock budget (default 4)")
    p.add_argument("--n", type=int, default=1000, help="samples per evaluation (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    from . import bench
    from .eval import report

    bench.add_parser(sub)  # fewstep bench
    report.add_parser(sub)  # fewstep report

    p = sub.add_parser("datasets", help="list the built-in datasets and mixture teachers")
    p.set_defaults(func=cmd_datasets)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except FewstepError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder where a file must go, a full disk, no permission: say which path
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"fewstep: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        saved = str(e).endswith("state saved")  # the loop stopped cleanly and saved where it was
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
            return 130
        print(f"fewstep: {e if saved else 'interrupted'}; re-run the same command to resume from "
              f"{'there' if saved else 'the last checkpoint'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
