"""Straightness of a model's sampling trajectories (Liu et al. 2022, "Flow straight and fast", Def. 2.2).

On rectified flow's clock (X_t = t·x_σ, σ = (1 − t)/t; :mod:`fewstep.diffusion.conversions`)

    S = ∫ E‖(X_1 − X_{t_0})/(1 − t_0) − v(X_t, t)‖² dt / (1 − t_0)    over t ∈ [t_0, 1],

the mean squared gap between the velocity along the probability-flow ODE trajectory and the constant
velocity of the straight line between its ends. t_0 = 1/(1 + σ_max) is where sampling starts (the
paper's t_0 = 0 is σ = ∞); the squared norm is averaged over dimensions so that S does not grow with
the image size. S = 0 exactly when every trajectory is a straight line travelled at constant speed,
the case where one Euler step is exact. ``relative`` divides S by E‖(X_1 − X_{t_0})/(1 − t_0)‖².
"""
from __future__ import annotations

import torch
from torch import nn

from ..diffusion.conversions import flow_t, flow_velocity
from ..diffusion.samplers import euler, flow_sigmas


@torch.no_grad()
def straightness(denoiser: nn.Module, noise: torch.Tensor, *, sigma_max: float = 80.0, steps: int = 100,
                 labels=None) -> dict[str, float]:
    """S of the trajectories from ``sigma_max·noise`` by Euler's method, ``steps`` uniform steps in t.

    Returns ``{"straightness": S, "relative": S / E‖straight velocity‖², "steps": steps}``.
    The integral is the Euler rule over the steps' left ends (uniform in t, so equally weighted)."""
    sigmas = flow_sigmas(steps, sigma_max).to(noise.device)
    velocities = []

    def record(x, sigma, denoised, **_):
        velocities.append(flow_velocity(denoised.float(), x.float(), sigma.float()))

    x0 = noise * sigmas[0]
    res = euler(denoiser, x0, sigmas, labels, callback=lambda info: record(**info))
    t0 = float(flow_t(sigmas[0].double()))
    chord = (res.x.float() - t0 * x0.float()) / (1 - t0)  # (X_1 − X_{t_0})/(1 − t_0)
    gap = torch.stack([(chord - v).pow(2).flatten(1).mean(1) for v in velocities]).mean(0)
    ref = chord.pow(2).flatten(1).mean(1)
    return {"straightness": float(gap.mean()), "relative": float(gap.mean() / ref.mean()), "steps": int(steps)}


def model_straightness(model, n: int = 1000, *, seed: int = 0, steps: int = 100) -> dict:
    """:func:`straightness` of a :class:`fewstep.model.FewstepModel`'s probability-flow trajectories from the noise
    :func:`fewstep.model.FewstepModel.sample` starts from at ``seed`` (σ_max: its recipe's, else 80; labels
    balanced over the classes of a conditional model, unguided)."""
    from ..diffusion.samplers import initial_noise
    from ..errors import FewstepError
    from ..model import balanced_labels

    if model.is_generator:
        raise FewstepError("a one-step generator has no sampling trajectory to measure the straightness of: "
                           "pass a multi-step model (a teacher, or a reflow, progressive, TRACT or CD student)")
    if n < 1 or steps < 1:
        raise FewstepError(f"straightness needs n >= 1 and steps >= 1, got n={n}, steps={steps}")
    shape = (n,) + tuple(model.data_info.sample_shape)
    z = initial_noise(shape, seed, model.device)
    labels = balanced_labels(n, model.data_info.num_classes, model.device)
    sigma_max = float(model.sampling.get("sigma_max", 80.0))
    return {**straightness(model.denoiser, z, sigma_max=sigma_max, steps=steps, labels=labels), "n": n,
            "seed": seed, "sigma_max": sigma_max}


__all__ = ["straightness", "model_straightness"]
