"""Why a one-step SiD student misses an exact mixture teacher: fake score or generator?

    python benchmarks/sid.py --only mixture --presets grid25   # first: the SiD run this reads
    python benchmarks/sid_mixture_diagnosis.py --preset grid25 --minutes 5

Reads the finished SiD run runs/benchmarks/sid-mixture-<preset> (EMA student, last training
state with the fake score) and measures, on n samples of the student:

1. the shape of the student's modes against the teacher's (a Gaussian mixture fitted to the
   student's samples, one component per teacher mode);
2. the fake score f_ψ against that fitted mixture's exact denoiser, next to the signal the
   generator loss lives on, |f_φ − f_student|, at several σ (if the fake score's error were
   as large as the signal, the generator would be steered by noise);
3. the SiD generator gradient at the student (fixed fake score; and with the fitted mixture's
   exact denoiser as an oracle fake score) against the exact reverse-KL gradient: per σ band and
   over SiD's own σ distribution: the mean over many batches, its per-batch signal-to-noise ratio
   |ḡ|²/E|g_b − ḡ|², and the cosine between the mean gradients;
4. a probe of the generator's own function class: the same network, from the SiD student,
   trained for --minutes by the exact reverse KL (2-D change of variables,
   KL(q‖p) = E_z[log N(z) − log|det ∂G/∂z| − log p(G(z))]) with the exact teacher density —
   the objective SiD's gradient approximates, without a fake score. How far it gets in the
   same CPU-minutes says whether the generator, not the fake score, is the bottleneck.

Writes benchmarks/results/sid_<preset>_diagnosis.json.

    python benchmarks/sid_mixture_diagnosis.py --preset grid25 --from-init 2000

instead runs only the reverse-KL probe, from SiD's own starting point (the shipped MLP teacher
that benchmarks/sid.py passes as --init) with SiD's generator optimiser (Adam with the preset's
benchmark lr_g, β = (0, 0.999), batch 256) for that many iterations, and writes
benchmarks/results/sid_<preset>_reverse_kl_from_init.json. It needs no SiD run: it asks whether
the generator, from where SiD starts, can reach the teacher at all when its gradient is exact.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, RUNS, environment, threads, write_json  # noqa: E402


def mode_stats(x, mix) -> dict:
    import torch

    d = torch.cdist(x, mix.means).min(1).values
    return {"log_likelihood": mix.log_prob(x).mean().item(), "median_dist_to_nearest_mean": d.median().item(),
            "frac_beyond_0.1": (d > 0.1).float().mean().item()}


def fake_score_accuracy(fake, x, mix, sigmas, seed=0) -> tuple[dict, list]:
    import torch
    from sklearn.mixture import GaussianMixture as SkMixture

    from fewstep.diffusion.mixture import GaussianMixture

    sk = SkMixture(mix.num_components, means_init=mix.means.numpy(), covariance_type="full",
                   random_state=seed).fit(x.numpy())
    fitted = GaussianMixture(torch.tensor(sk.weights_), torch.tensor(sk.means_), torch.tensor(sk.covariances_))
    stds = torch.tensor(sk.covariances_).diagonal(dim1=1, dim2=2).sqrt()
    shape = {"student_component_std_median": stds.median().item(),
             "teacher_component_std": mix.covs[0, 0, 0].sqrt().item(),
             "fitted_mixture_loglik_on_student": fitted.log_prob(x).mean().item()}
    g = torch.Generator().manual_seed(seed)
    rows = []
    for s in sigmas:
        xt = x + s * torch.randn(x.shape, generator=g, dtype=x.dtype)
        with torch.no_grad():
            f_fake = fake(xt.float(), torch.full((len(x),), s)).double()
        f_student, f_teacher = fitted.denoise(xt, s), mix.denoise(xt, s)
        rms = lambda v: (v ** 2).sum(1).mean().sqrt().item()  # noqa: E731
        rows.append({"sigma": s, "signal_rms": rms(f_teacher - f_student), "fake_error_rms": rms(f_fake - f_student),
                     "cosine_fake_vs_fitted_direction": torch.nn.functional.cosine_similarity(
                         f_teacher - f_fake, f_teacher - f_student, dim=1).mean().item()})
    return shape, rows, fitted


def reverse_kl_loss(G, mix, sigma_init, batch):
    import torch

    from fewstep.model import one_step_generate

    z = torch.randn(batch, 2, requires_grad=True)
    x = one_step_generate(G, z, sigma_init)
    jac = torch.stack([torch.autograd.grad(x[:, i].sum(), z, create_graph=True)[0] for i in range(2)], 1)
    # KL(q‖p) up to the constant E log N(z): −log|det ∂G/∂z| − log p(G(z))
    return (-torch.linalg.slogdet(jac)[1] - mix.log_prob(x.double()).float()).mean()


def gradient_stats(G, loss_fn, batches) -> tuple:
    """Mean gradient over ``batches`` batches and its per-batch signal-to-noise ratio."""
    import torch

    params = [p for p in G.parameters() if p.requires_grad]
    total, sq = None, 0.0
    for _ in range(batches):
        g = torch.cat([t.flatten() for t in torch.autograd.grad(loss_fn(), params)]).double()
        total = g if total is None else total + g
        sq += g.square().sum().item()
    mean = total / batches
    var = sq / batches - mean.square().sum().item()
    return mean, {"mean_norm": mean.norm().item(), "per_batch_snr": mean.square().sum().item() / max(var, 1e-30),
                  "batches": batches}


SIGMA_BANDS = [(0.002, 0.03), (0.03, 0.1), (0.1, 0.3), (0.3, 1.0), (1.0, 24.4)]


def gradient_comparison(G, fake, fitted, mix, sigma_init, batches=200, batch=256, seed=0) -> dict:
    """Mean SiD gradients (learned and oracle fake score) per σ band and over SiD's own σ
    distribution, against the mean exact reverse-KL gradient. A cosine is only meaningful where
    the mean's own signal-to-noise ratio (per-batch SNR × batches) is well above 1."""
    import torch

    from fewstep.methods.fake_score import generator_sigma
    from fewstep.methods.sid import sid_generator_loss
    from fewstep.model import one_step_generate

    teacher, oracle = mix.denoiser(), fitted.denoiser()
    cos = torch.nn.functional.cosine_similarity

    def sid(fake_net, band):
        def fn():
            x = one_step_generate(G, torch.randn(batch, 2), sigma_init)
            if band is None:
                s = generator_sigma(batch)
            else:
                s = torch.empty(batch).uniform_(math.log(band[0]), math.log(band[1])).exp()
            return sid_generator_loss(x, teacher, fake_net, None, sigma=s)[0].mean()
        return fn

    torch.manual_seed(seed)
    rkl, out = gradient_stats(G, lambda: reverse_kl_loss(G, mix, sigma_init, batch), batches)
    out = {"reverse_kl_exact": out, "sid": []}
    for band in [None, *SIGMA_BANDS]:
        row = {"sigma_band": "SiD's (t_max 800)" if band is None else list(band)}
        means = {}
        for name, f in (("learned_fake", fake), ("oracle_fake", oracle)):
            means[name], st = gradient_stats(G, sid(f, band), batches)
            row[name] = {**st, "mean_snr": st["per_batch_snr"] * batches,
                         "cosine_to_reverse_kl": cos(means[name], rkl, dim=0).item()}
        row["cosine_learned_vs_oracle"] = cos(means["learned_fake"], means["oracle_fake"], dim=0).item()
        out["sid"].append(row)
        print(json.dumps(row), flush=True)
    return out


def reverse_kl_probe(G, mix, sigma_init, minutes, lr, batch=256, eval_every=500, n_eval=20000,
                     betas=(0.9, 0.999), iterations=None) -> list:
    """Train a copy of ``G`` by the exact reverse KL for ``minutes`` (or ``iterations``)."""
    import torch

    from fewstep.model import one_step_generate

    G = copy.deepcopy(G).train()
    opt = torch.optim.Adam(G.parameters(), lr=lr, betas=betas)
    curve, t0, it = [], time.time(), 0
    while (it < iterations) if iterations is not None else (time.time() - t0 < minutes * 60):
        loss = reverse_kl_loss(G, mix, sigma_init, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        if it % eval_every == 0:
            with torch.no_grad():
                xs = one_step_generate(G, torch.randn(n_eval, 2, generator=torch.Generator().manual_seed(0)),
                                       sigma_init).double()
            curve.append({"iteration": it, "seconds": round(time.time() - t0, 1), **mode_stats(xs, mix)})
            print(json.dumps(curve[-1]), flush=True)
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="grid25", choices=["ring8", "grid25"])
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-clock of the reverse-KL probe")
    ap.add_argument("--lr", type=float, default=2e-5, help="Adam lr of the probe (β = 0.9, 0.999)")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--from-init", type=int, default=0, metavar="ITERATIONS",
                    help="only the reverse-KL probe, from SiD's initialisation, for this many iterations")
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    from fewstep.diffusion.mixture import preset
    from fewstep.model import load_model, one_step_generate

    torch.set_num_threads(threads())
    torch.manual_seed(0)
    if args.from_init:
        from sid import MIXTURE_BATCH, MIXTURES, mixture_lr_g

        from fewstep.methods.fake_score import FakeScoreConfig

        sid_defaults, init = FakeScoreConfig(), f"fewstep/assets/teachers/{MIXTURES[args.preset]}"
        lr = mixture_lr_g(args.preset)
        G, mix, t0 = load_model(ROOT / init).denoiser, preset(args.preset), time.time()
        res = {"preset": args.preset, "init": init, "sigma_init": sid_defaults.sigma_init, "optimizer": "Adam",
               "lr": lr, "betas": list(sid_defaults.betas), "batch": MIXTURE_BATCH,
               "iterations": args.from_init, "n_eval": 20000,
               "curve": reverse_kl_probe(G, mix, sid_defaults.sigma_init, None, lr, batch=MIXTURE_BATCH,
                                         betas=sid_defaults.betas, iterations=args.from_init,
                                         eval_every=max(args.from_init // 10, 1))}
        res["wall_seconds"] = round(time.time() - t0, 1)
        res["command"] = f"python benchmarks/sid_mixture_diagnosis.py --preset {args.preset} --from-init {args.from_init}"
        res["environment"] = environment()
        write_json(f"sid_{args.preset}_reverse_kl_from_init.json", res)
        return
    run = RUNS / f"sid-mixture-{args.preset}"
    states = sorted((run / "checkpoints").glob("state-*"))
    if not (run / "model").is_dir() or not states:
        sys.exit(f"no finished SiD run in {run}: run `python benchmarks/sid.py --only mixture --presets "
                 f"{args.preset}` first")
    student = load_model(run / "model")
    sigma_init = float(student.sampling["sigma_init"])
    tensors = load_file(states[-1] / "state.safetensors")
    fake = copy.deepcopy(student.denoiser)
    fake.load_state_dict({k[len("net.fake."):]: v for k, v in tensors.items() if k.startswith("net.fake.")})
    mix = preset(args.preset)
    with torch.no_grad():
        x = one_step_generate(student.denoiser, torch.randn(args.n, 2, generator=torch.Generator().manual_seed(1)),
                              sigma_init).double()
    teacher_x = mix.sample(args.n, generator=torch.Generator().manual_seed(1)).double()
    shape, rows, fitted = fake_score_accuracy(fake, x, mix, [0.005, 0.02, 0.05, 0.1, 0.3, 1.0])
    res = {"preset": args.preset, "run": str(run), "state": states[-1].name, "n_samples": args.n,
           "student": mode_stats(x, mix), "true_samples": mode_stats(teacher_x, mix), **shape,
           "fake_score_vs_fitted_student_denoiser": rows}
    res["gradients_at_student"] = gradient_comparison(student.denoiser, fake, fitted, mix, sigma_init)
    print(json.dumps(res, indent=1), flush=True)
    t0 = time.time()
    res["reverse_kl_probe"] = {"minutes": args.minutes, "lr": args.lr, "betas": [0.9, 0.999], "batch": 256,
                               "curve": reverse_kl_probe(student.denoiser, mix, sigma_init, args.minutes, args.lr)}
    res["reverse_kl_probe"]["wall_seconds"] = round(time.time() - t0, 1)
    res["command"] = f"python benchmarks/sid_mixture_diagnosis.py --preset {args.preset} --minutes {args.minutes}"
    res["environment"] = environment()
    write_json(f"sid_{args.preset}_diagnosis.json", res)


if __name__ == "__main__":
    main()
