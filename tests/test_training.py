"""The shared training loop: learning, checkpoints, exact resume, NaN handling, data parallelism."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewstep.data import load_dataset
from fewstep.diffusion.denoiser import edm_loss
from fewstep.diffusion.mixture import preset
from fewstep.errors import FewstepError
from fewstep.methods.base import DataInfo, Method, Phase
from fewstep.model import load_model
from fewstep.teachers.training import EDMTeacher, TeacherConfig
from fewstep.training.checkpoint import write_checkpoint_dir
from fewstep.training.loop import TrainConfig, Trainer

INFO = DataInfo(kind="points", sample_shape=(2,), name="8gaussians")


def _teacher(net, seed=0):
    torch.manual_seed(seed)
    return EDMTeacher(TeacherConfig(net=net, lr=2e-3, lr_rampup_kimg=0.5), INFO)


def _cfg(**kw):
    base = dict(total_kimg=6.4, batch_size=128, ema_halflife_kimg=0.5, log_every_kimg=0.64,
                snapshot_every_kimg=100, checkpoint_every_kimg=1.28, progress=False, snapshot_samples=16)
    base.update(kw)
    return TrainConfig(**base)


def _fixed_loss(den, x0):
    g = torch.Generator().manual_seed(0)
    sigma = (torch.randn(x0.shape[0], generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return float(edm_loss(den, x0, sigma=sigma, noise=noise))


def test_teacher_loss_decreases_and_model_round_trips(tmp_path, tiny_mlp):
    """The EDM loss approaches its floor: the loss of the exact mixture denoiser (DESIGN §2)."""
    ds = load_dataset("8gaussians", split="train", n=4000)
    held = load_dataset("8gaussians", split="test", n=2000).x
    floor = _fixed_loss(preset("ring8").denoiser(), held)
    m = _teacher(tiny_mlp)
    before = _fixed_loss(m.denoiser, held)
    summary = Trainer(m, _cfg(total_kimg=25.6, log_every_kimg=2.56), tmp_path / "run", dataset=ds).run_training()
    after = _fixed_loss(m.denoiser, held)
    assert after - floor < 0.6 * (before - floor), (floor, before, after)
    assert summary["nimg"] == 25600 and summary["stop_reason"] == "done"
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert len(stats) == 10 and stats[-1]["kimg"] == pytest.approx(25.6)
    # the exported model (EMA weights) reloads to identical outputs
    model = load_model(tmp_path / "run")
    x, s = torch.randn(8, 2), torch.rand(8) + 0.1
    again = load_model(tmp_path / "run" / "model" / "model.safetensors")
    torch.testing.assert_close(model.denoiser(x, s), again.denoiser(x, s), rtol=0, atol=0)
    assert model.config["provenance"]["kimg"] == pytest.approx(25.6)


def _weights(trainer):
    m = trainer.method
    out = {f"net.{k}": v.clone() for n in m.nets.values() for k, v in n.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in trainer.ema.ema.state_dict().items()})
    return out


def test_interrupted_run_resumes_exactly(tmp_path, tiny_mlp):
    ds = load_dataset("8gaussians", split="train", n=2000)
    full = Trainer(_teacher(tiny_mlp), _cfg(total_kimg=2.56), tmp_path / "a", dataset=ds)
    full.run_training()
    part = Trainer(_teacher(tiny_mlp), _cfg(total_kimg=2.56), tmp_path / "b", dataset=ds)
    part.run_training(max_iterations=7)  # stops mid-way, between checkpoints
    assert part.iteration == 7
    resumed = Trainer(_teacher(tiny_mlp, seed=99), _cfg(total_kimg=2.56), tmp_path / "b", dataset=ds)
    resumed.run_training()
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    stats = (tmp_path / "b" / "stats.jsonl").read_text().splitlines()
    other = Trainer(_teacher(tiny_mlp), _cfg(total_kimg=2.56, batch_size=64, seed=5), tmp_path / "b", dataset=ds)
    other.run_training(max_iterations=0)  # a resume with other options says what they change
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "used --batch-size 128, this resume uses 64" in log and "--seed 5 is ignored on resume" in log
    assert [json.loads(s)["nimg"] for s in stats] == [json.loads(s)["nimg"] for s in
                                                       (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]


def test_snapshots_and_evaluations_of_the_live_network_leave_it_training(tmp_path, tiny_mlp):
    """Without an EMA the loop samples and evaluates the network being trained, in eval mode; its
    dropout must be back on for the next iteration, and a resume must retrace the run exactly."""
    net = {**tiny_mlp, "dropout": 0.2}
    ds = load_dataset("8gaussians", split="train", n=2000)
    cfg = _cfg(total_kimg=2.56, ema_halflife_kimg=0.0, snapshot_every_kimg=0.64, eval_every_kimg=0.64)
    full = _teacher(net)
    modes = []
    begin = full.begin_iteration
    full.begin_iteration = lambda nimg, total: (modes.append(full.nets[full.ema_net].training), begin(nimg, total))
    evaluations = []

    def evaluator(model):
        evaluations.append(model.denoiser.training)
        return {"n": 1}
    Trainer(full, cfg, tmp_path / "a", dataset=ds, evaluator=evaluator).run_training()
    assert len(modes) == 20 and all(modes)
    assert len(evaluations) >= 3 and not any(evaluations)  # evaluated in eval mode
    assert len(list((tmp_path / "a" / "samples").glob("samples-*.png"))) == 3  # 0.64 kimg apart: none overwritten
    Trainer(_teacher(net), cfg, tmp_path / "b", dataset=ds, evaluator=evaluator).run_training(max_iterations=7)
    resumed = _teacher(net, seed=99)
    Trainer(resumed, cfg, tmp_path / "b", dataset=ds, evaluator=evaluator).run_training()
    a, b = full.nets[full.ema_net].state_dict(), resumed.nets[resumed.ema_net].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_crash_between_the_two_renames_of_a_checkpoint_swap_loses_nothing(tmp_path, tiny_mlp):
    """write_checkpoint_dir moves the old folder aside, then the new one into place; a kill between
    the two leaves only the old one aside, which every reader (and the next write) puts back."""
    import os

    ds = load_dataset("8gaussians", split="train", n=2000)
    run = tmp_path / "run"
    Trainer(_teacher(tiny_mlp), _cfg(total_kimg=1.28, keep_checkpoints=1), run, dataset=ds).run_training()
    before = load_model(run).denoiser.state_dict()
    state = sorted((run / "checkpoints").glob("state-*"))
    assert len(state) == 1
    for folder in (run / "model", state[0]):  # the first rename of a swap, and then the kill
        os.replace(folder, folder.with_name(f".{folder.name}.old"))
    for junk in (run / "checkpoints" / ".state-00000012.k3j9x1", run / ".model.q8z2"):  # killed mid-write
        junk.mkdir()
    after = load_model(run).denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    resumed = Trainer(_teacher(tiny_mlp), _cfg(total_kimg=1.28, keep_checkpoints=1), run, dataset=ds)
    assert resumed.latest_state() == state[0]
    resumed.run_training()
    assert resumed.iteration == 10 and not list(run.rglob(".*.old"))
    assert not (run / "checkpoints" / ".state-00000012.k3j9x1").exists()  # half-written states are removed
    write_checkpoint_dir(run / "model", {"config.json": {"a": 1}, "model.safetensors": {"w": torch.zeros(1)}})
    assert not (run / ".model.q8z2").exists()
    # a folder holding anything but a checkpoint is never replaced (model.save(".") must not empty the folder)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FewstepError, match="other files than a checkpoint's"):
        write_checkpoint_dir(tmp_path / "mine", {"config.json": {"a": 1}})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    os.chdir(run / "model")  # nor the current folder: the swap would move it away under the process
    try:
        with pytest.raises(FewstepError, match="current folder"):
            write_checkpoint_dir(Path("."), {"config.json": {"a": 1}, "model.safetensors": {"w": torch.zeros(1)}})
    finally:
        os.chdir(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_interrupted_gpu_run_resumes_exactly(tmp_path, tiny_mlp):
    """On a GPU the losses draw their noise from the device's generator: its state is checkpointed too."""
    ds = load_dataset("8gaussians", split="train", n=2000)
    cfg = _cfg(total_kimg=2.56, device="cuda")
    full = Trainer(_teacher(tiny_mlp), cfg, tmp_path / "a", dataset=ds)
    full.run_training()
    Trainer(_teacher(tiny_mlp), cfg, tmp_path / "b", dataset=ds).run_training(max_iterations=7)
    resumed = Trainer(_teacher(tiny_mlp, seed=99), cfg, tmp_path / "b", dataset=ds)
    resumed.run_training()
    a, b = _weights(full), _weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torchrun_on_gpus_gives_each_process_its_own_gpu_and_a_backend_for_cpu_decisions(monkeypatch):
    from fewstep.training import distributed as dist

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.process_device("cuda") == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert dist.process_device("cuda:0") == torch.device("cuda", 0)  # an explicit GPU is kept
    assert dist.process_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert dist.process_device("cuda") == torch.device("cuda")  # one process: the current GPU
    # NCCL carries only CUDA tensors; the loop's stop/skip decisions are CPU tensors
    assert dist.backend_for(torch.device("cuda", 1)) == "cpu:gloo,cuda:nccl"
    assert dist.backend_for(torch.device("cpu")) == "gloo"


def test_ema_ramp_up_counts_the_images_seen_before_each_step_as_edm_does(tmp_path, tiny_mlp):
    """EDM caps the half-life at ratio·cur_nimg with cur_nimg counted before the step: the first
    step's β is 0 (the EMA copies the weights), and step i's is 0.5^(1/(ratio·i')) with i' = i − 1."""
    ds = load_dataset("8gaussians", split="train", n=2000)
    t = Trainer(_teacher(tiny_mlp), _cfg(ema_rampup=0.5), tmp_path / "a", dataset=ds)
    t.run_training(max_iterations=1)
    live, ema = t.method.nets[t.method.ema_net].state_dict(), t.ema.ema.state_dict()
    assert all(torch.equal(live[k], ema[k]) for k in live)
    start = {k: v.clone() for k, v in live.items()}
    t.run_training(max_iterations=1)  # the second step: β = 0.5^(128 / (0.5·128)) = 0.25
    live = t.method.nets[t.method.ema_net].state_dict()
    for k, v in t.ema.ema.state_dict().items():
        torch.testing.assert_close(v, 0.25 * start[k] + 0.75 * live[k])


def _cli(*args):
    return [sys.executable, "-m", "fewstep", *args]


def test_killed_cli_run_resumes_and_matches_uninterrupted(tmp_path):
    args = ["teacher", "--data", "8gaussians", "--net", json.dumps({"name": "mlp", "dim": 2, "width": 32,
            "depth": 2, "emb_channels": 16}), "--total-kimg", "12.8", "--batch-size", "64",
            "--checkpoint-every-kimg", "0.64", "--snapshot-every-kimg", "100", "--no-progress",
            "--ema-halflife-kimg", "0.5"]
    env = {**os.environ, "FEWSTEP_THREADS": "1"}
    ref = subprocess.run(_cli(*args, "--out", str(tmp_path / "ref")), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    p = subprocess.Popen(_cli(*args, "--out", str(run)), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((run / "checkpoints").glob("state-*"))) < 2:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    res = subprocess.run(_cli(*args, "--out", str(run)), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed from state-" in (run / "log.txt").read_text()
    a = load_model(tmp_path / "ref").denoiser.state_dict()
    b = load_model(run).denoiser.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_saves_the_state_where_it_stopped_and_the_run_resumes_exactly(tmp_path):
    """The first Ctrl-C ends the loop after the current iteration and saves the training state there (no
    periodic checkpoint in this run), exit code 130; the same command then resumes to the uninterrupted result."""
    args = ["teacher", "--data", "8gaussians", "--net", json.dumps({"name": "mlp", "dim": 2, "width": 32,
            "depth": 2, "emb_channels": 16}), "--total-kimg", "25.6", "--batch-size", "64",
            "--checkpoint-every-kimg", "1000", "--snapshot-every-kimg", "1000", "--log-every-kimg", "0.064",
            "--no-progress", "--ema-halflife-kimg", "0.5"]
    env = {**os.environ, "FEWSTEP_THREADS": "1"}
    ref = subprocess.run(_cli(*args, "--out", str(tmp_path / "ref")), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "int"
    # SIGINT at its default in the child, as at a terminal: a suite run as a background job (`pytest &`) hands its
    # children SIGINT ignored, which Python, and so fewstep, then leaves ignored
    p = subprocess.Popen(_cli(*args, "--out", str(run)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and (not (run / "stats.jsonl").is_file()
                                      or len((run / "stats.jsonl").read_text().splitlines()) < 5):
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "state saved" in err and "re-run the same command" in err and "Traceback" not in err
    states = list((run / "checkpoints").glob("state-*"))
    assert len(states) == 1 and json.loads((run / "summary.json").read_text())["stop_reason"] == "interrupted"
    res = subprocess.run(_cli(*args, "--out", str(run)), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed from state-" in (run / "log.txt").read_text()
    a, b = load_model(tmp_path / "ref").denoiser.state_dict(), load_model(run).denoiser.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _NaNMethod(Method):
    name = "nan-test"

    def __init__(self, nan_every):
        super().__init__(None)
        self.w = torch.nn.Linear(2, 2)
        self.nets = {"w": self.w}
        self.nan_every = nan_every
        self.calls = 0

    def build_optimizers(self):
        return {"w": torch.optim.SGD(self.w.parameters(), lr=0.1)}

    def loss(self, batch):
        self.calls += 1
        loss = self.w(torch.ones(1, 2)).pow(2).sum()
        if self.calls % self.nan_every == 0:
            loss = loss * float("nan")
        return loss, {}

    def phases(self):
        return [Phase("w", "w", self.loss)]

    def export_config(self):
        return {}


def test_nonfinite_losses_are_skipped_and_counted_then_stop(tmp_path):
    m = _NaNMethod(nan_every=3)
    s = Trainer(m, _cfg(total_kimg=1.28, batch_size=64), tmp_path / "r").run_training()
    assert s["nonfinite_losses"] == 20 // 3
    assert all(torch.isfinite(p).all() for p in m.w.parameters())
    assert "non-finite w loss" in (tmp_path / "r" / "log.txt").read_text()
    with pytest.raises(FewstepError, match="consecutive non-finite"):
        Trainer(_NaNMethod(nan_every=1), _cfg(total_kimg=1.28, batch_size=64, max_nonfinite=5),
                tmp_path / "r2").run_training()


class _ClipMethod(Method):
    name = "clip-test"

    def __init__(self, clip):
        super().__init__(None)
        self.p = torch.nn.Parameter(torch.zeros(3))
        self.nets = {"p": torch.nn.ParameterList([self.p])}
        self.clip = clip

    def build_optimizers(self):
        return {"p": torch.optim.SGD([self.p], lr=1.0)}

    def loss(self, batch):  # gradient (100, 0.001, −100)
        return (self.p * torch.tensor([100.0, 0.001, -100.0])).sum(), {}

    def phases(self):
        return [Phase("p", "p", self.loss, grad_clip_value=self.clip)]

    def export_config(self):
        return {}


@pytest.mark.parametrize("clip, step", [(1.0, [-1.0, -0.001, 1.0]), (None, [-100.0, -0.001, 100.0])])
def test_loop_clips_a_phase_gradient_element_wise(tmp_path, clip, step):
    m = _ClipMethod(clip)
    Trainer(m, _cfg(total_kimg=0.064, batch_size=64), tmp_path / "r").run_training()  # one SGD step, lr 1
    torch.testing.assert_close(m.p.detach(), torch.tensor(step))


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_runs_the_losses_matmuls_in_bf16_and_keeps_weights_and_grads_fp32(tmp_path, precision, dtype):
    m, seen = _NaNMethod(nan_every=10**9), []  # its loss is a matmul; no NaN in three steps
    m.w.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    Trainer(m, _cfg(total_kimg=0.192, batch_size=64, precision=precision), tmp_path / "r").run_training()
    assert seen == [dtype] * 3
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in m.w.parameters())
    assert not torch.is_autocast_enabled("cpu")  # the context ends with the phase


def test_bad_config_values_are_clear_errors():
    from fewstep.config import from_dict
    from fewstep.methods.sid import SiDConfig

    with pytest.raises(FewstepError, match="batch_size must be >= 1"):
        from_dict(TrainConfig, {"batch_size": 0})
    with pytest.raises(FewstepError, match="unknown key"):
        from_dict(TrainConfig, {"batchsize": 3})
    with pytest.raises(FewstepError, match="precision must be one of fp32, bf16, got 'fp16'"):
        from_dict(TrainConfig, {"precision": "fp16"})
    # intervals are counted in whole images (0.0001 kimg would divide by zero inside the loop)
    with pytest.raises(FewstepError, match=r"snapshot_every_kimg must be at least 0.001 \(one image\)"):
        from_dict(TrainConfig, {"snapshot_every_kimg": 0.0001})
    with pytest.raises(FewstepError, match="eval_every_kimg must be 0"):
        from_dict(TrainConfig, {"eval_every_kimg": 0.0004})
    # list-typed fields: a scalar, a wrong length or a non-number is named, not a TypeError from deep inside
    with pytest.raises(FewstepError, match="t_max_anneal_kimg must be a list, got 150"):
        from_dict(SiDConfig, {"t_max_anneal_kimg": 150})
    with pytest.raises(FewstepError, match="betas must be a list of 2 values"):
        from_dict(SiDConfig, {"betas": [0.0, 0.9, 0.999]})
    with pytest.raises(FewstepError, match=r"t_max_anneal_kimg\[1\] must be a number"):
        from_dict(SiDConfig, {"t_max_anneal_kimg": [100, "b"]})
    with pytest.raises(FewstepError, match="lr_g must be a number"):
        from_dict(SiDConfig, {"lr_g": "fast"})
    assert from_dict(SiDConfig, {"betas": [0, 0.99], "t_max_anneal_kimg": [150, 150]}).betas == (0.0, 0.99)


def _ddp_run(tmp_path, *args, timeout=300):
    script = Path(__file__).parent / "helpers" / "ddp_run.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 str(script), str(tmp_path), *args], env=env,
                                stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun passes SIGTERM on to its workers (each in its own session)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise AssertionError(f"the 2-process run did not finish within {timeout} s (ranks deadlocked?)")
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_two_process_data_parallel_keeps_replicas_identical(tmp_path):
    _ddp_run(tmp_path)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    init = torch.load(tmp_path / "init1.pt", weights_only=True)
    assert any(not torch.equal(init[k], w1[f"net.{k}"]) for k in init)  # it did train
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["nimg"] == 2 * 64 * summary["iterations"]


def test_two_process_nonfinite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path):
    # one rank skipping alone would leave the other in the gradient all-reduce (timeout here)
    _ddp_run(tmp_path, "nan", timeout=120)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nonfinite_losses"] == 1 and summary["nimg"] == 2 * 64 * summary["iterations"]
    assert "non-finite denoiser loss on another rank; step skipped" in (tmp_path / "run" / "log.txt").read_text()
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_two_process_in_run_evaluation_with_frechet_distance_does_not_wait_for_other_ranks(tmp_path):
    # torchmetrics gathers across ranks on compute by default: rank 0 alone evaluating deadlocked
    _ddp_run(tmp_path, "eval", timeout=120)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(evals) >= 3 and all(e["fd"] >= 0 for e in evals)


def test_two_process_resume_is_bit_exact_on_every_rank(tmp_path):
    # each rank's noise and data streams are checkpointed; restoring rank 0's on every rank would
    # make the ranks draw the same batches after a resume (and differ from the straight run)
    _ddp_run(tmp_path, "resume", timeout=180)
    for r in (0, 1):
        straight = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"resumed{r}.pt", weights_only=True)
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), r


def test_two_process_time_budget_stops_every_rank_at_the_same_iteration(tmp_path):
    # rank 1's clock runs 3x fast: deciding on each rank's own clock deadlocks (timeout here)
    _ddp_run(tmp_path, "budget", timeout=120)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "time budget" and summary["train_seconds"] >= 3.0
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_teacher_config_refuses_values_that_would_fail_or_turn_nan_later():
    from fewstep.config import from_dict

    with pytest.raises(FewstepError, match=r"betas must be two Adam betas in \[0, 1\)"):
        from_dict(TeacherConfig, {"betas": [1.5, 0.999]})
    with pytest.raises(FewstepError, match="sigma_data must be a finite number"):
        from_dict(TeacherConfig, {"sigma_data": float("inf")})
    with pytest.raises(FewstepError, match="net must be a JSON object"):
        from_dict(TeacherConfig, {"net": "unet"})
