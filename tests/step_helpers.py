"""Shared pieces of the step-distillation tests (progressive, TRACT, KD): a small 2-D denoiser
for exact mixture teachers, the methods' training defaults, and a three-mode test mixture."""
import torch

from fewstep.diffusion.denoiser import EDMPrecond
from fewstep.diffusion.mixture import GaussianMixture
from fewstep.model import FewstepModel
from fewstep.nets.build import build_net
from fewstep.training.loop import TrainConfig, Trainer

NET = {"name": "mlp", "dim": 2, "width": 32, "depth": 2, "emb_channels": 16}


def three_mode_mixture(shift: float = 0.0) -> GaussianMixture:
    means = torch.tensor([[-0.6, 0.1], [0.5, -0.2], [0.0, 0.7]], dtype=torch.float64) + shift
    return GaussianMixture([0.3, 0.5, 0.2], means, torch.tensor([0.04, 0.02, 0.05]))


def init_model(teacher: FewstepModel, net=NET, seed=0) -> FewstepModel:
    """An untrained fewstep denoiser for the mixture's data (what --init gives an exact teacher)."""
    cfg = {"format": "fewstep.model", "version": 1, "type": "denoiser", "net": net,
           "precond": {"name": "edm", "sigma_data": 0.5}, "data": teacher.config["data"],
           "sampling": {"sampler": "heun", "steps": 18, "schedule": "karras"}}
    return FewstepModel(EDMPrecond(build_net(net, seed=seed)), cfg)


def train_config(**kw) -> TrainConfig:
    base = dict(total_kimg=2.0, batch_size=100, progress=False, snapshot_every_kimg=100,
                checkpoint_every_kimg=0.5, log_every_kimg=0.5, snapshot_samples=8,
                ema_halflife_kimg=0.0, grad_clip=1.0)  # the methods' train_defaults
    base.update(kw)
    return TrainConfig(**base)


def perturbed_conditional_denoiser(scale: float, num_classes: int = 3):
    """(net config, EDM denoiser) of a class-conditional 2-D MLP, weights perturbed by ``scale``·N(0, 1) so that
    its output depends on its inputs and labels (a fresh one's output layer is zero)."""
    net = {**NET, "num_classes": num_classes}
    torch.manual_seed(0)
    den = EDMPrecond(build_net(net))
    with torch.no_grad():
        for p in den.parameters():
            p.add_(scale * torch.randn_like(p))
    return net, den


def straight_and_resumed(make, cfg: TrainConfig, root, dataset=None, kill_after: int = 5):
    """The same run twice from ``make()`` (a fresh, seeded method): straight through in ``root/a``, and in
    ``root/b`` stopped after ``kill_after`` iterations (a killed run), then resumed by another fresh method.
    Returns ``(straight, resumed)``."""
    straight = make()
    Trainer(straight, cfg, root / "a", dataset=dataset).run_training()
    Trainer(make(), cfg, root / "b", dataset=dataset).run_training(max_iterations=kill_after)
    resumed = make()
    Trainer(resumed, cfg, root / "b", dataset=dataset).run_training()
    return straight, resumed


def ring8_one_step_map_errors(method, tmp_path) -> tuple[float, float]:
    """Train ``method`` (a consistency model on ring8, created by the caller) for 100 kimg at batch 256, then
    ``(mean distance of its one-step map f(80·z, 80) to the exact teacher's 35-NFE Heun sample from the same z,
    the same for the exact teacher's own single denoising step)``."""
    from fewstep.data import load_dataset
    from fewstep.diffusion.samplers import heun, make_sigmas
    from fewstep.model import load_model
    from fewstep.training.loop import Trainer

    teacher = load_model("mixture:ring8")
    Trainer(method, train_config(total_kimg=100.0, batch_size=256, ema_halflife_kimg=2.0, checkpoint_every_kimg=1000,
                                 log_every_kimg=1000), tmp_path / "run",
            dataset=load_dataset("mixture:ring8", n=20000)).run_training()
    student = load_model(tmp_path / "run")
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    sig = make_sigmas("karras", 18)
    x_teacher = heun(teacher.denoiser, z * sig[0], sig).x
    with torch.no_grad():
        x_student = student.denoiser(z * 80.0, torch.full((2000,), 80.0))
        x_one = teacher.denoiser(z * 80.0, torch.full((2000,), 80.0))
    return float((x_student - x_teacher).norm(dim=1).mean()), float((x_one - x_teacher).norm(dim=1).mean())


def ring8_cli_args(tmp_path) -> list[str]:
    """The command-line options of a tiny run on mixture:ring8 from an untrained MLP saved as --init."""
    from fewstep.model import load_model, save_model

    init = init_model(load_model("mixture:ring8"))
    save_model(tmp_path / "init", init.denoiser, init.config)
    return ["--teacher", "mixture:ring8", "--init", str(tmp_path / "init"), "--data", "mixture:ring8",
            "--total-kimg", "0.4", "--batch-size", "100", "--no-progress", "--snapshot-every-kimg", "100",
            "--checkpoint-every-kimg", "100"]


def assert_cli_samples_at_steps(run, tmp_path, capsys, steps=(1, 2)) -> None:
    """`fewstep sample RUN --steps k` works and reports k evaluations, for each k."""
    import json

    from fewstep.cli import main as cli_main

    capsys.readouterr()
    for k in steps:
        assert cli_main(["sample", str(run), "--n", "16", "--steps", str(k), "--out", str(tmp_path / f"s{k}.npy")]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nfe"] == k
