"""An exact teacher: Gaussian mixtures in any dimension (DESIGN §2).

For p_0 = Σ_k π_k N(μ_k, Σ_k) the σ-noised marginal is Σ_k π_k N(μ_k, Σ_k + σ²I)
and the optimal denoiser is closed-form:

    E[x_0 | x_σ] = Σ_k r_k(x) · (μ_k + Σ_k (Σ_k + σ²I)⁻¹ (x − μ_k)),
    r_k(x) ∝ π_k N(x; μ_k, Σ_k + σ²I).

Each Σ_k is eigendecomposed once, Σ_k = U_k diag(λ_k) U_kᵀ, so for any per-sample σ
    (Σ_k + σ²I)⁻¹ = U_k diag(1/(λ_k + σ²)) U_kᵀ,   log det(Σ_k + σ²I) = Σ log(λ_k + σ²),
and every quantity is a cheap batched product. Everything is computed in float64.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import FewstepError
from .denoiser import SIGMA_DATA, as_sigma

_LOG_2PI = math.log(2 * math.pi)


class GaussianMixture:
    """p_0 = Σ_k π_k N(μ_k, Σ_k) with exact noisy densities and denoiser (DESIGN §2).

    Args:
        weights: ``[K]`` non-negative mixture weights (normalised here).
        means: ``[K, D]`` component means.
        covs: ``[K, D, D]`` full covariances, ``[K, D]`` per-dimension variances,
            or ``[K]`` isotropic variances. Must be positive definite.
    """

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        c = torch.as_tensor(covs, dtype=torch.float64)
        if mu.ndim != 2 or mu.shape[0] != w.shape[0]:
            raise FewstepError(f"means must be [K, D] with K = len(weights) = {w.shape[0]}, "
                               f"got {tuple(mu.shape)}")
        k, d = mu.shape
        if c.shape == (k,):
            c = c[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif c.shape == (k, d):
            c = torch.diag_embed(c)
        elif c.shape != (k, d, d):
            raise FewstepError(f"covs must be [K, D, D], [K, D] or [K] with K={k}, D={d}; "
                               f"got {tuple(c.shape)}")
        if (w < 0).any() or w.sum() <= 0:
            raise FewstepError("mixture weights must be non-negative with a positive sum")
        c = 0.5 * (c + c.transpose(-1, -2))
        evals, evecs = torch.linalg.eigh(c)
        if (evals <= 0).any():
            raise FewstepError("every mixture covariance must be positive definite")
        self.weights, self.means, self.covs = w / w.sum(), mu, c
        self._evals, self._evecs = evals, evecs  # Σ_k = U diag(λ) Uᵀ
        self._cache: dict = {}

    # -- basic properties ----------------------------------------------------
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        """E[x_0] = Σ π_k μ_k."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov[x_0] = Σ π_k (Σ_k + μ_k μ_kᵀ) − m mᵀ."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - m[:, None] * m[None, :]

    def _params(self, device):
        """Parameters on ``device`` (cached): π, μ, λ, U stacked as [D, K·D] and μ_kᵀU_k."""
        key = str(device)
        if key not in self._cache:
            k, d = self.num_components, self.dim
            u_cat = self._evecs.permute(1, 0, 2).reshape(d, k * d)  # x @ u_cat = [U_kᵀx]_k
            mu_u = torch.einsum("kd,kde->ke", self.means, self._evecs)
            self._cache[key] = tuple(t.to(device) for t in
                                     (self.weights, self.means, self._evals, u_cat, mu_u))
        return self._cache[key]

    # -- exact noisy-marginal quantities --------------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.dim:
            raise FewstepError(f"mixture has dimension {self.dim}, got inputs with {x.shape[1]} values each")
        return x.double()

    def _component_terms(self, x: torch.Tensor, sigma):
        """log π_k N(x; μ_k, Σ_k+σ²I) ``[N,K]`` plus the eigenbasis pieces the denoiser reuses."""
        xf = self._flat(x)
        n, k, d = xf.shape[0], self.num_components, self.dim
        s2 = as_sigma(sigma, xf).pow(2)  # [N]
        w, mu, lam, u_cat, mu_u = self._params(xf.device)
        y = (xf @ u_cat).view(n, k, d) - mu_u[None]  # U_kᵀ(x − μ_k): [N,K,D]
        # eigenvalues of Σ_k + σ²I; one shared [1,K,D] table when all σ agree (samplers)
        var = (lam + s2[0])[None] if n and bool((s2 == s2[0]).all()) else lam[None] + s2[:, None, None]
        logn = -0.5 * ((y**2 / var).sum(-1) + var.log().sum(-1) + d * _LOG_2PI)
        return xf, w.log()[None] + logn, y, lam, var

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """Exact log p_σ(x) = log Σ_k π_k N(x; μ_k, Σ_k + σ²I), shape ``[N]`` (float64)."""
        return torch.logsumexp(self._component_terms(x, sigma)[1], dim=1)

    def responsibilities(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """r_k(x) = p(component k | x_σ = x), shape ``[N, K]`` (float64)."""
        return torch.softmax(self._component_terms(x, sigma)[1], dim=1)

    def denoise(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Closed-form E[x_0 | x_σ = x] (DESIGN §2), same shape and dtype as ``x``.

        With ``labels`` (LongTensor ``[N]``), label k < K conditions on component k
        (E[x_0 | x_σ, k]) and label K means "no label" (the full mixture).
        """
        xf, logits, y, lam, var = self._component_terms(x, sigma)
        r = torch.softmax(logits, dim=1)
        if labels is not None:
            labels = torch.as_tensor(labels, device=xf.device).long().expand(xf.shape[0])
            k = self.num_components
            if ((labels < 0) | (labels > k)).any():
                raise FewstepError(f"mixture labels must be in 0..{k} ({k} = no label)")
            onehot = torch.nn.functional.one_hot(labels.clamp(max=k - 1), k).double()
            r = torch.where((labels < k)[:, None], onehot, r)
        # Σ_k r_k(μ_k + Σ_k(Σ_k+σ²I)⁻¹(x − μ_k))
        #   = r·μ + Σ_k U_k (r_k · λ_k/(λ_k+σ²) ⊙ U_kᵀ(x − μ_k))   (one GEMM over all k)
        _, mu, _, u_cat, _ = self._params(xf.device)
        z = r[:, :, None] * y * (lam[None] / var)  # [N,K,D]
        x0 = r @ mu + z.reshape(xf.shape[0], -1) @ u_cat.T
        return x0.reshape(x.shape).to(x.dtype)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """∇_x log p_σ(x) via Tweedie: (E[x_0|x] − x)/σ² (σ > 0)."""
        s = as_sigma(sigma, x.reshape(x.shape[0], -1).double())
        d = self.denoise(x.double(), s).reshape(x.shape[0], -1)
        return ((d - x.reshape(x.shape[0], -1).double()) / s[:, None] ** 2).reshape(x.shape).to(x.dtype)

    def denoiser(self, conditional: bool = False) -> "MixtureDenoiser":
        """The exact denoiser as an ``nn.Module`` ``D(x, sigma, labels=None)``.

        ``conditional=True`` gives a class-conditional teacher with ``num_classes = K``:
        label k selects component k, label K is "no label" (handy for guidance tests).
        """
        return MixtureDenoiser(self, conditional)

    # -- sampling -------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, return_components: bool = False,
               *, dtype: torch.dtype = torch.float32):
        """Draw ``n`` samples ``[n, D]`` (CPU, ``dtype``); optionally also their component ids."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scale = self._evecs * self._evals.sqrt()[:, None, :]  # U_k diag(√λ_k): Σ_k = scale scaleᵀ
        x = self.means[comp] + torch.einsum("nde,ne->nd", scale[comp], z)
        x = x.to(dtype)
        return (x, comp) if return_components else x

    # -- serialisation ---------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-friendly dict (plain lists) that :meth:`from_dict` turns back into the mixture."""
        return {"weights": self.weights.tolist(), "means": self.means.tolist(), "covs": self.covs.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "GaussianMixture":
        try:
            return cls(d["weights"], d["means"], d["covs"])
        except KeyError as e:
            raise FewstepError(f"mixture dict is missing {e}; expected keys weights, means, covs") from None

    def standardised(self, std: float = SIGMA_DATA) -> "GaussianMixture":
        """Affine copy with zero mean and every coordinate's standard deviation equal to ``std``."""
        m, v = self.mean(), self.covariance().diagonal()
        a = std / v.sqrt()
        return GaussianMixture(self.weights, (self.means - m) * a,
                               self.covs * a[:, None] * a[None, :])

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim})"


class MixtureDenoiser(nn.Module):
    """``nn.Module`` view of :meth:`GaussianMixture.denoise` (float64 inside, input dtype out)."""

    def __init__(self, mixture: GaussianMixture, conditional: bool = False):
        super().__init__()
        self.mixture = mixture
        self.conditional = bool(conditional)

    @property
    def num_classes(self) -> int:
        return self.mixture.num_components if self.conditional else 0

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional and labels is None:
            raise FewstepError(
                f"this mixture denoiser is class-conditional; pass labels (0..{self.num_classes}, "
                f"{self.num_classes} = no label)")
        return self.mixture.denoise(x, sigma, labels if self.conditional else None)


# ---------------------------------------------------------------------------
# Presets, all in model space: zero mean, per-coordinate std 0.5 (= σ_data)
# ---------------------------------------------------------------------------

def _ring8() -> GaussianMixture:
    # Classic 8-Gaussians toy (radius/std = 8). Per-coordinate variance of a uniform ring
    # is r²/2 + s², so r²(1/2 + 1/64) = σ_d² fixes r ≈ 0.696 and s = r/8 ≈ 0.087.
    r = SIGMA_DATA / math.sqrt(0.5 + 1 / 64)
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = r * torch.stack([ang.cos(), ang.sin()], dim=1)
    return GaussianMixture(torch.ones(8), means, torch.full((8,), (r / 8) ** 2))


def _grid25() -> GaussianMixture:
    # 5×5 grid {−2a, …, 2a}², spacing/std = 8: per-coordinate variance 2a² + (a/8)² = σ_d².
    a = SIGMA_DATA / math.sqrt(2 + 1 / 64)
    g = a * torch.arange(-2, 3, dtype=torch.float64)
    means = torch.cartesian_prod(g, g)
    return GaussianMixture(torch.ones(25), means, torch.full((25,), (a / 8) ** 2))


def _mix16d() -> GaussianMixture:
    # 8 components in 16-D with unequal weights and random full covariances (fixed seed),
    # eigenvalues spread over a decade; means ~ N(0, I) sit ≈ 5.7 apart vs. component
    # stds ≤ 0.35 before standardisation, so the modes are well separated.
    g = torch.Generator().manual_seed(16)
    k, d = 8, 16
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=torch.float64))
    lam = 0.0125 * 10 ** torch.rand(k, d, generator=g, dtype=torch.float64)  # 0.0125 … 0.125
    covs = q @ torch.diag_embed(lam) @ q.transpose(-1, -2)
    weights = 1 + torch.rand(k, generator=g, dtype=torch.float64)
    return GaussianMixture(weights, means, covs).standardised(SIGMA_DATA)


_BUILDERS = {"ring8": _ring8, "grid25": _grid25, "mix16d": _mix16d}

PRESETS = {
    "ring8": "2-D: 8 equal Gaussians on a ring of radius 0.70, std 0.087 (radius/std = 8)",
    "grid25": "2-D: 25 equal Gaussians on a 5x5 grid with spacing 0.35, std 0.044 (spacing/std = 8)",
    "mix16d": "16-D: 8 Gaussians, unequal weights, random full covariances (seed 16)",
}


def preset(name: str) -> GaussianMixture:
    """A named mixture from :data:`PRESETS` (zero mean, each coordinate with std 0.5)."""
    if name not in _BUILDERS:
        raise FewstepError(f"unknown mixture preset {name!r}; choose one of {sorted(PRESETS)}")
    return _BUILDERS[name]()


__all__ = ["GaussianMixture", "MixtureDenoiser", "PRESETS", "preset"]
