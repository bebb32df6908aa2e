"""The one convention of fewstep: σ-space denoisers (DESIGN §1).

A *denoiser* is any ``nn.Module`` with ``forward(x, sigma, labels=None) -> x0_hat``
where ``x_σ = x_0 + σ·ε``. ``sigma`` has shape ``[N]`` (one noise level per
sample). Teachers, fake-score networks and one-step generators are all
denoisers; foreign parameterisations are converted at the boundary
(:mod:`fewstep.diffusion.conversions`).
"""
from __future__ import annotations


import torch
from torch import nn

SIGMA_DATA = 0.5  # EDM's σ_data for images in [-1, 1] and standardised points


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a ``[N]`` tensor to ``[N, 1, ..., 1]`` with ``ndim`` dimensions."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a float or tensor σ to a ``[N]`` tensor on ``x``'s device/dtype."""
    s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    return s.reshape(x.shape[0])


def edm_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """EDM preconditioning coefficients (DESIGN §1): c_skip, c_out, c_in, c_noise."""
    s2, d2 = sigma**2, sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1.0 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise)  (EDM, Karras et al. 2022).

    ``net`` is a raw backbone ``F(x_in, c_noise, labels)`` from :mod:`fewstep.nets`.
    """

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0) or 0)

    @property
    def guidance_embedding(self) -> bool:
        """Whether the backbone also takes the guidance scale κ (a guidance-distilled net)."""
        return bool(getattr(self.net, "guidance_embedding", False))

    @property
    def path_embedding(self) -> bool:
        """Whether the backbone also takes a path noise level σ_p (a BOOT student)."""
        return bool(getattr(self.net, "path_embedding", False))

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None,
                guidance=None, path=None) -> torch.Tensor:
        """D(x, σ); ``guidance``: κ (a number or ``[N]``) for a guidance-conditioned backbone;
        ``path``: σ_p (a number or ``[N]``) for a path-conditioned one (BOOT)."""
        return self._precond(x, sigma, labels, features=False, guidance=guidance, path=path)

    def forward_with_features(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None):
        """``(D(x, σ), encoder features)`` from one pass, for backbones with ``return_features``
        (the UNet's down-path output; SiDA's discriminator reads it)."""
        return self._precond(x, sigma, labels, features=True)

    def encoder_features(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's encoder features of ``c_in·x`` alone (no decoder pass)."""
        sigma = as_sigma(sigma, x)
        _, _, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        return self.net.encoder_features(append_dims(c_in, x.ndim) * x, c_noise, labels)

    def _precond(self, x, sigma, labels, *, features: bool, guidance=None, path=None):
        sigma = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        nd = x.ndim
        g = {} if guidance is None else {"guidance": guidance}  # backbones without a guidance input keep theirs
        if path is not None:
            g["path"] = path
        if features:
            f, feats = self.net(append_dims(c_in, nd) * x, c_noise, labels, return_features=True, **g)
        else:
            f = self.net(append_dims(c_in, nd) * x, c_noise, labels, **g)
        d = append_dims(c_skip, nd) * x + append_dims(c_out, nd) * f.to(x.dtype)
        return (d, feats) if features else d


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)²  (DESIGN §1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_edm_sigma(n: int, p_mean: float = -1.2, p_std: float = 1.2, *, device=None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """ln σ ~ N(P_mean, P_std²)  (EDM training distribution)."""
    z = torch.randn(n, device=device, generator=generator)
    return (p_mean + p_std * z).exp()


def edm_loss(denoiser: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None = None, *,
             sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = SIGMA_DATA,
             reduce: bool = True) -> torch.Tensor:
    """EDM denoising loss λ(σ)·‖D(x_0 + σε, σ) − x_0‖² (DESIGN §1), a pure function.

    Returns the per-sample loss (summed over dimensions) or its mean.
    """
    n = x0.shape[0]
    if sigma is None:
        sigma = sample_edm_sigma(n, p_mean, p_std, device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x = x0 + append_dims(sigma, x0.ndim) * noise
    d = denoiser(x, sigma, labels)
    per = edm_loss_weight(sigma, sigma_data) * (d - x0).pow(2).flatten(1).sum(1)
    return per.mean() if reduce else per


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None, append_zero: bool = True) -> torch.Tensor:
    """Karras grid σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then σ_n = 0."""
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1 steps, got {n}")
    if n == 1:
        s = torch.tensor([float(sigma_max)], dtype=torch.float64)
    else:
        i = torch.arange(n, dtype=torch.float64)
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        s = (a + i / (n - 1) * (b - a)) ** rho
    if append_zero:
        s = torch.cat([s, s.new_zeros(1)])
    return s.to(device=device, dtype=torch.float32)


def karras_ramp(t: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0) -> torch.Tensor:
    """Continuous Karras ramp σ(t) = (σ_max^{1/ρ} + (1−t)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ.

    t = 1 gives σ_max and t = 0 gives σ_min (SiD's generator-σ parameterisation, DESIGN §3).
    """
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + (1 - t) * (b - a)) ** rho


__all__ = [
    "SIGMA_DATA", "append_dims", "as_sigma", "edm_scalings", "EDMPrecond", "edm_loss_weight",
    "sample_edm_sigma", "edm_loss", "karras_sigmas", "karras_ramp",
]
