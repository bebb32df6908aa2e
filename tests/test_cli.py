"""The `fewstep` command end to end, and its errors for bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fewstep.cli import main
from fewstep.model import load_model

NET = json.dumps({"name": "mlp", "dim": 2, "width": 32, "depth": 2, "emb_channels": 16})
QUIET = ["--no-progress", "--snapshot-every-kimg", "100", "--checkpoint-every-kimg", "100"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "teacher"
    assert main(["teacher", "--data", "8gaussians", "--out", str(out), "--net", NET, "--total-kimg", "3",
                 "--batch-size", "128", *QUIET]) == 0
    return out


@pytest.mark.parametrize("method", ["sid", "diff-instruct", "dmd"])
def test_distill_sample_eval(method, teacher_run, tmp_path, capsys):
    out = tmp_path / method
    assert main(["distill", method, "--teacher", str(teacher_run), "--out", str(out), "--total-kimg", "0.5",
                 "--batch-size", "64", "--eval-n", "200", *QUIET]) == 0
    student = load_model(out)
    assert student.is_generator and student.nfe() == 1
    assert student.config["provenance"]["method"] == method
    res = student.sample(10, seed=3)
    assert res.nfe == 1 and res.x.shape == (10, 2) and torch.isfinite(res.x).all()
    torch.testing.assert_close(res.x, student.sample(10, seed=3).x)  # seeds reproduce
    capsys.readouterr()
    assert main(["sample", str(out), "--n", "20", "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["x"].shape == (20, 2)
    assert main(["sample", str(out), "--n", "20", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["eval", str(out), "--n", "300", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["nfe"] == 1 and metrics["n_samples"] == 300 and "log_likelihood" in metrics
    assert json.loads((tmp_path / "m.json").read_text())["nfe"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_metrics"]["nfe"] == 1
    assert (out / "samples" / "final.png").is_file() and (out / "metrics.jsonl").is_file()


def test_eval_uses_the_schedule_it_is_given(teacher_run, capsys):
    common = ["eval", str(teacher_run), "--n", "200", "--sampler", "ddim", "--steps", "4"]
    out = {}
    for schedule in ("karras", "vp-uniform"):
        capsys.readouterr()
        assert main(common + ["--schedule", schedule]) == 0
        out[schedule] = json.loads(capsys.readouterr().out)
        assert out[schedule]["schedule"] == schedule and out[schedule]["nfe"] == 4
    assert out["karras"]["log_likelihood"] != out["vp-uniform"]["log_likelihood"]  # the grids differ
    capsys.readouterr()
    assert main(common) == 0
    assert json.loads(capsys.readouterr().out)["log_likelihood"] == out["karras"]["log_likelihood"]  # the recipe's


def test_eval_over_several_noise_seeds(teacher_run, tmp_path, capsys):
    common = ["eval", str(teacher_run), "--n", "200", "--sampler", "heun", "--steps", "4"]
    capsys.readouterr()
    assert main(common + ["--seeds", "1", "2", "3", "--json", str(tmp_path / "m.json")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["seeds"] == [1, 2, 3] and res["nfe"] == 7 and res["n_samples"] == 200
    ll = [res["by_seed"][s]["log_likelihood"] for s in ("1", "2", "3")]
    assert len(set(ll)) == 3  # the seeds draw different noise
    assert res["mean"]["log_likelihood"] == pytest.approx(float(np.mean(ll)), rel=1e-12)
    assert res["std"]["log_likelihood"] == pytest.approx(float(np.std(ll, ddof=1)), rel=1e-9)
    assert json.loads((tmp_path / "m.json").read_text())["seeds"] == [1, 2, 3]
    assert main(common + ["--seed", "2"]) == 0  # a seed of the set, alone: the same numbers
    assert json.loads(capsys.readouterr().out)["log_likelihood"] == res["by_seed"]["2"]["log_likelihood"]
    assert "distinct" in _err(common + ["--seeds", "1", "1"], capsys)


def test_sid_from_exact_mixture_teacher_needs_and_uses_init(teacher_run, tmp_path, capsys):
    out = tmp_path / "mix"
    assert main(["distill", "sid", "--teacher", "mixture:ring8", "--out", str(out), "--total-kimg", "0.3",
                 *QUIET]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(["distill", "sid", "--teacher", "mixture:ring8", "--init", str(teacher_run), "--out", str(out),
                 "--total-kimg", "0.3", *QUIET]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["teacher"] == "mixture:ring8" and cfg["data"] == "mixture:ring8"


def test_teacher_sampling_with_every_sampler(teacher_run, tmp_path, capsys):
    for sampler, steps, nfe in [("euler", 4, 4), ("heun", 4, 7), ("ddim", 4, 4), ("dpmpp-2m", 4, 4)]:
        capsys.readouterr()
        assert main(["sample", str(teacher_run), "--sampler", sampler, "--steps", str(steps), "--n", "8",
                     "--out", str(tmp_path / f"{sampler}.npy")]) == 0
        assert json.loads(capsys.readouterr().out)["nfe"] == nfe


def _err(argv, capsys):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_bad_input_gives_clear_errors(teacher_run, tmp_path, capsys):
    assert "unknown dataset" in _err(["teacher", "--data", "cifar99", "--out", str(tmp_path / "x")], capsys).lower()
    assert "no checkpoint at" in _err(["sample", str(tmp_path / "nope"), "--out", str(tmp_path / "a.png")], capsys)
    assert "batch_size must be >= 1" in _err(["teacher", "--data", "8gaussians", "--out", str(tmp_path / "y"),
                                              "--batch-size", "0"], capsys)
    assert "alpha must be >= 0" in _err(["distill", "sid", "--teacher", str(teacher_run), "--out",
                                         str(tmp_path / "z"), "--alpha", "-1"], capsys)
    # a corrupt weights file
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text((teacher_run / "model" / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert "corrupt" in _err(["sample", str(bad), "--out", str(tmp_path / "b.png")], capsys)
    # a pickle is refused
    pkl = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, pkl)
    assert "pickle" in _err(["eval", str(pkl)], capsys)
    # a run folder holding a different run is not overwritten
    assert "different" in _err(["distill", "dmd", "--teacher", str(teacher_run), "--out", str(teacher_run)], capsys)
    assert "--out must end in" in _err(["sample", str(teacher_run), "--out", str(tmp_path / "x.gif")], capsys)


def test_help_lists_methods_and_options():
    res = subprocess.run([sys.executable, "-m", "fewstep", "distill", "sid", "--help"], capture_output=True,
                         text=True)
    assert res.returncode == 0
    for opt in ("--alpha", "--sigma-init", "--lr-g", "--total-kimg", "--guidance-teacher", "--init"):
        assert opt in res.stdout
    res = subprocess.run([sys.executable, "-m", "fewstep", "distill", "--help"], capture_output=True, text=True)
    for m in ("sid", "diff-instruct", "dmd", "progressive", "tract", "kd", "cd", "reflow", "guidance", "boot"):
        assert m in res.stdout


def test_eval_with_a_feature_net_trained_on_your_own_labelled_images(tmp_path, capsys):
    """`--feature-net FILE`: FD & co. in the space of a feature net the user trained on their own data
    (`python -m fewstep.eval.feature_net --dataset PATH`); the shipped one passed by path gives the default."""
    from fewstep.data import load_dataset
    from fewstep.eval import feature_net

    ds = load_dataset("digits", split="all")
    mine = tmp_path / "mine.npz"
    np.savez(mine, x=ds.x.numpy(), labels=ds.labels.numpy())
    common = ["eval", "shipped:digits", "--n", "60", "--sampler", "euler", "--steps", "2"]
    capsys.readouterr()
    assert main(common + ["--data", str(mine)]) == 2
    assert "--feature-net" in capsys.readouterr().err  # the error names the way out
    assert feature_net.main(["--dataset", str(mine), "--epochs", "1", "--out", str(tmp_path / "f.safetensors")]) == 0
    capsys.readouterr()
    assert main(common + ["--data", str(mine), "--feature-net", str(tmp_path / "f.safetensors")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["feature_net"] == "mine-featnet" and r["fd_mine-featnet"] > 0  # named after the file
    assert "fd_floor_mine-featnet" in r
    shipped = feature_net.asset_paths("digits")[0]
    assert main(common + ["--data", "digits"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(common + ["--data", "digits", "--feature-net", str(shipped)]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert explicit["fd_digits-featnet"] == default["fd_digits-featnet"]
    # in-run evaluation while training on those images: refused before training without a feature net
    train = ["teacher", "--data", str(mine), "--out", str(tmp_path / "t"), "--total-kimg", "0.064", "--batch-size",
             "32", "--eval-n", "40", *QUIET]
    assert main(train) == 2
    assert "--feature-net" in capsys.readouterr().err and not (tmp_path / "t" / "checkpoints").exists()
    assert main(train + ["--feature-net", str(tmp_path / "f.safetensors")]) == 0
    curve = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert curve and all("fd_mine-featnet" in r for r in curve)


def test_bad_input_is_refused_before_any_training(teacher_run, tmp_path, capsys, monkeypatch):
    def refused(argv, match):
        out = tmp_path / "never"
        assert match in _err([*argv[:3], "--out", str(out), *argv[3:]], capsys)
        assert not (out / "model").exists()  # nothing was trained

    sid = ["distill", "sid", f"--teacher={teacher_run}", "--total-kimg", "0.2", *QUIET]
    refused(sid + ["--eval-n", "-5"], "--eval-n must be >= 1")
    refused(sid + ["--data", "digits"], "holds samples of shape [1, 8, 8] but the teacher makes [2]")
    refused(sid + ["--guidance-teacher", "3"], "needs a class-conditional teacher")
    refused(sid + ["--eval-every-kimg", "0.1"], "--eval-every-kimg needs --eval-n")
    refused(sid + ["--snapshot-samples", "0"], "snapshot_samples must be >= 1")
    refused(["distill", "dmd", f"--teacher={teacher_run}", "--regression-weight", "0.25", "--regression-steps", "0"],
            "regression_steps must be >= 1")
    if not torch.cuda.is_available():
        refused(sid + ["--device", "cuda"], "no usable GPU")
    monkeypatch.setenv("FEWSTEP_THREADS", "two")
    refused(sid, "FEWSTEP_THREADS must be a whole number")


def test_sampling_options_are_used_or_refused_never_ignored(teacher_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sid"
    assert main(["distill", "sid", "--teacher", str(teacher_run), "--out", str(out), "--total-kimg", "0.1",
                 "--batch-size", "32", *QUIET]) == 0
    png = str(tmp_path / "s.png")
    assert "steps must be >= 1" in _err(["sample", str(teacher_run), "--steps", "0", "--out", png], capsys)
    assert "one-step generator" in _err(["sample", str(out), "--steps", "4", "--out", png], capsys)
    assert main(["sample", str(out), "--sampler", "heun", "--steps", "4", "--out", png]) == 0  # as a denoiser
    assert main(["sample", str(out), "--n", "5", "--out", str(tmp_path / "S.NPY")]) == 0  # suffixes in any case
    assert np.load(tmp_path / "S.NPY").shape == (5, 2)
    assert "--out must end in" in _err(["sample", str(out), "--out", str(tmp_path / "s.gif")], capsys)
    (tmp_path / "file").write_text("x")
    assert str(tmp_path / "file") in _err(["sample", str(out), "--out", str(tmp_path / "file" / "s.png")], capsys)
    monkeypatch.chdir(out)  # "." inside a run folder, and a bare weights file name inside its model folder
    assert main(["sample", ".", "--n", "4", "--out", png]) == 0
    monkeypatch.chdir(out / "model")
    assert main(["sample", "model.safetensors", "--n", "4", "--out", png]) == 0


def test_the_same_command_on_a_finished_run_changes_nothing(teacher_run, tmp_path, capsys):
    out = tmp_path / "done"
    argv = ["distill", "sid", "--teacher", str(teacher_run), "--out", str(out), "--total-kimg", "0.2",
            "--batch-size", "32", "--eval-n", "100", *QUIET]
    assert main(argv) == 0
    files = {p: p.read_bytes() for p in (out / "metrics.jsonl", out / "summary.json", out / "samples" / "final.png")}
    capsys.readouterr()
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().err
    assert all(p.read_bytes() == b for p, b in files.items())  # no second evaluation row, no new picture


def test_method_help_shows_the_defaults_it_runs_with_and_optional_values_take_null(teacher_run, tmp_path):
    res = subprocess.run([sys.executable, "-m", "fewstep", "distill", "progressive", "--help"], capture_output=True,
                         text=True)
    text = " ".join(res.stdout.split())
    assert "--ema-halflife-kimg FLOAT EMA half-life of the student in kimg (0 = no EMA) (default: 0.0)" in text
    assert "(default: 1.0)" in text.split("--grad-clip", 2)[2][:200]  # progressive clips at 1 (S&H)
    from fewstep.cli import build_parser
    from fewstep.cli_args import dataclass_from_args
    from fewstep.training.loop import TrainConfig

    args = build_parser().parse_args(["distill", "progressive", "--teacher", "x", "--out", "y", "--grad-clip", "null"])
    assert dataclass_from_args(TrainConfig, args, {"grad_clip": 1.0}).grad_clip is None


def test_export_refuses_a_folder_that_is_not_empty(teacher_run, tmp_path, capsys):
    assert "not an empty folder" in _err(["export", str(teacher_run), "--out", str(teacher_run)], capsys)


def test_resuming_with_another_init_is_refused_and_keeps_the_runs_config(teacher_run, tmp_path, capsys):
    out = tmp_path / "mix"
    base = ["distill", "sid", "--teacher", "mixture:ring8", "--out", str(out), "--total-kimg", "0.1",
            "--batch-size", "32", *QUIET]
    assert main(base + ["--init", str(teacher_run)]) == 0
    cfg = (out / "config.json").read_text()
    assert "different init" in _err(base + ["--total-kimg", "0.2", "--init", "shipped:8gaussians"], capsys)
    assert (out / "config.json").read_text() == cfg


def test_a_partial_net_changes_the_datas_preset(tmp_path):
    out = tmp_path / "t"
    assert main(["teacher", "--data", "8gaussians", "--net", '{"width": 24}', "--out", str(out), "--total-kimg",
                 "0.064", "--batch-size", "32", *QUIET]) == 0
    net = json.loads((out / "model" / "config.json").read_text())["net"]
    assert net["name"] == "mlp" and net["width"] == 24  # the preset's other fields kept
