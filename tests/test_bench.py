"""`fewstep bench`: methods on one teacher with one budget, evaluated alike, written to JSON/Markdown/plots."""
import json

import pytest

from fewstep.cli import main
from fewstep.errors import FewstepError

NET = json.dumps({"name": "mlp", "dim": 2, "width": 32, "depth": 2, "emb_channels": 16})
QUIET = ["--no-progress", "--snapshot-every-kimg", "100", "--checkpoint-every-kimg", "100"]
SMALL = ["--eval-n", "100", "--batch-size", "64", "--teacher-samplers", "heun", "--teacher-steps", "2",
         "--grid-n", "16", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "teacher"
    assert main(["teacher", "--data", "8gaussians", "--out", str(out), "--net", NET, "--total-kimg", "2",
                 "--batch-size", "128", *QUIET]) == 0
    return out


def test_two_methods_end_to_end_write_every_file(teacher, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--teacher", str(teacher), "--methods", "sid,progressive,cd,not-a-method",
                 "--budget-kimg", "0.32", "--out", str(out), "--curve-points", "2", "--eval-max-share", "1",
                 "--set", "progressive.start_steps=4", "--set", "progressive.lr=1e-3", *SMALL]) == 0
    for f in ("results.json", "results.md", "report.html", "metric_vs_time.png", "metric_vs_kimg.png", "metric_vs_nfe.png",
              "samples.png", "runs/sid/summary.json", "runs/sid/metrics.jsonl", "runs/progressive/stages/steps-1"):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())
    assert res["format"] == "fewstep.bench" and res["meta"]["command"].startswith("fewstep bench")
    assert set(res["methods"]) == {"sid", "progressive", "cd"} and "not-a-method" in res["absent"]
    assert all(m["status"] == "ok" for m in res["methods"].values())
    # the same budget and seed for every method, the same sample count and noise seed for every row
    assert {m["train_config"]["seed"] for m in res["methods"].values()} == {0}
    assert all(m["train"]["kimg"] >= 0.32 for m in res["methods"].values())
    assert {r["n_samples"] for r in res["rows"]} == {100} and {r["seed"] for r in res["rows"]} == {1}
    # students at their own NFE: SiD one step, progressive every stage (2 and 1 steps), the consistency model
    # at its own 1 step and at 2 and 4 steps of the multistep sampler
    nfe = {(r["model"], r["nfe"]) for r in res["rows"]}
    assert {("sid", 1), ("progressive", 2), ("progressive", 1), ("teacher", 3), ("teacher", 35), ("cd", 1), ("cd", 2),
            ("cd", 4)} <= nfe
    assert res["methods"]["progressive"]["method_config"]["start_steps"] == 4
    assert len(res["methods"]["sid"]["curve"]) >= 2  # in-run evaluations: the curves' points
    md = (out / "results.md").read_text()
    for col in ("log-lik", "precision", "recall", "mode coverage", "NFE", "train kimg", "**not-a-method** (absent)"):
        assert col in md, col
    assert "progressive (1 step)" in md and "cd (4 steps)" in md
    assert "| sid | one-step |" in capsys.readouterr().out  # the table is printed too


def test_methods_that_do_not_fit_the_teacher_are_skipped_with_the_reason(tmp_path):
    from fewstep.bench import BenchConfig, run_bench

    cfg = BenchConfig(teacher="mixture:ring8", out=str(tmp_path / "b"), methods=["sid", "progressive"],
                      budget_kimg=0.1, eval_n=50, teacher_samplers=["euler"], teacher_steps=[2], grid_n=8,
                      progress=False)
    res = run_bench(cfg)
    for m in ("sid", "progressive"):
        assert res["methods"][m]["status"] == "skipped" and "--init" in res["methods"][m]["reason"]
    assert [r["model"] for r in res["rows"]] == ["teacher", "teacher"]  # euler 2 steps + the own recipe (heun 18)
    md = (tmp_path / "b" / "results.md").read_text()
    assert "**sid** (skipped)" in md and "--init" in md


def test_a_registered_method_joins_without_editing_the_harness(teacher, tmp_path, monkeypatch):
    from fewstep.bench import BenchConfig, registered_methods, run_bench
    from fewstep.methods.base import METHODS
    from fewstep.methods.sid import SiD

    class TinySiD(SiD):
        name = "tiny-sid"
        summary = "a method registered by a test"

    monkeypatch.setitem(METHODS, "tiny-sid", TinySiD)  # what @register_method does, undone after the test
    assert "tiny-sid" in registered_methods()
    cfg = BenchConfig(teacher=str(teacher), out=str(tmp_path / "b"), methods=["tiny-sid"], budget_minutes=0.02,
                      eval_n=50, batch_size=32, teacher_samplers=["euler"], teacher_steps=[1], grid_n=8,
                      curve_points=2, progress=False)
    res = run_bench(cfg)
    m = res["methods"]["tiny-sid"]
    assert m["status"] == "ok" and m["summary"] == "a method registered by a test"
    assert m["plan"]["source"].startswith("throughput probe")  # a time budget becomes an images budget
    assert m["train"]["stop_reason"] in ("done", "time budget") and m["train"]["train_seconds"] <= 0.02 * 60 + 1
    assert any(r["model"] == "tiny-sid" and r["nfe"] == 1 for r in res["rows"])
    cfg.seed = 1  # the same folder with other settings: refused, never overwritten
    with pytest.raises(FewstepError, match="other settings"):
        run_bench(cfg)


def test_bad_bench_options_are_clear_errors(teacher, tmp_path, capsys, monkeypatch):
    def err(argv):
        capsys.readouterr()
        assert main(argv) == 2
        e = capsys.readouterr().err
        assert "Traceback" not in e
        return e

    base = ["bench", "--teacher", str(teacher), "--out", str(tmp_path / "x"), "--methods", "sid"]
    import fewstep.model

    def not_yet(*a, **k):
        raise AssertionError("the teacher was loaded before the options were checked")
    with monkeypatch.context() as mp:  # an unknown option is refused before the teacher is even loaded
        mp.setattr(fewstep.model, "load_model", not_yet)
        assert "no option 'nope'" in err(base + ["--budget-kimg", "0.1", "--set", "sid.nope=1", *SMALL])
    assert "METHOD.OPTION=VALUE" in err(base + ["--budget-kimg", "0.1", "--set", "oops"])
    assert "not among the benched" in err(base + ["--budget-kimg", "0.1", "--set", "dmd.lr_g=1"])
    assert "Inception weights not found" in err(base + ["--budget-kimg", "0.1", "--inception",
                                                         str(tmp_path / "none.pth")])
    with pytest.raises(SystemExit):  # argparse: exactly one budget
        main(base)


def test_tables_pick_the_headline_metric_and_format_cells():
    from fewstep.eval.tables import columns, fmt, primary_metric

    assert primary_metric({"nfe": 1, "fd_digits-featnet": 3.0, "fd_floor_digits-featnet": 1.0}) == (
        "fd_digits-featnet", 3.0, False)
    assert primary_metric({"nfe": 35, "log_likelihood": -1.0}) == ("log_likelihood", -1.0, True)
    assert primary_metric({"nfe": 1}) is None
    keys = [k for _, k in columns({"kind": "images", "fd_x-featnet": 1.0})]
    assert {"precision_x-featnet", "recall_x-featnet", "class_max_dev_x-featnet"} <= set(keys)
    assert "mode_coverage" in [k for _, k in columns({"kind": "mixture"})]
    assert fmt(None) == "" and fmt(3) == "3" and fmt(0.123456) == "0.1235" and fmt(21600.4) == "21600"
    with pytest.raises(FewstepError):
        from fewstep.bench import BenchConfig

        BenchConfig(teacher="t", out="o").validate()
