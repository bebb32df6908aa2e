"""EDM preconditioning, loss and Karras grid (DESIGN §1) against closed forms."""
import math

import pytest
import torch
from torch import nn

from fewstep.diffusion.denoiser import (
    SIGMA_DATA, EDMPrecond, append_dims, as_sigma, edm_loss, edm_loss_weight, edm_scalings,
    karras_ramp, karras_sigmas, sample_edm_sigma,
)
from fewstep.diffusion.mixture import GaussianMixture

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)


class ZeroNet(nn.Module):
    """A backbone that outputs zeros, recording what it was called with."""
    num_classes = 0

    def forward(self, x_in, c_noise, labels=None):
        self.seen = (x_in.clone(), c_noise.clone())
        return torch.zeros_like(x_in)


class LinearNet(nn.Module):
    """F(x_in, c_noise) = 3·x_in + c_noise (to check c_in, c_out, c_noise are applied)."""
    num_classes = 0

    def forward(self, x_in, c_noise, labels=None):
        return 3 * x_in + append_dims(c_noise, x_in.ndim)


def test_helpers_shapes():
    x = torch.zeros(4, 3, 2, 2)
    assert append_dims(torch.ones(4), 4).shape == (4, 1, 1, 1)
    assert as_sigma(0.5, x).shape == (4,) and as_sigma(0.5, x).dtype == x.dtype
    assert torch.equal(as_sigma(torch.arange(4.0), x), torch.arange(4.0))


def test_scalings_closed_forms_and_unit_variance_identities():
    c_skip, c_out, c_in, c_noise = edm_scalings(SIGMAS)
    s, d = SIGMAS, SIGMA_DATA
    torch.testing.assert_close(c_skip, d**2 / (s**2 + d**2))
    torch.testing.assert_close(c_out, s * d / (s**2 + d**2).sqrt())
    torch.testing.assert_close(c_noise, s.log() / 4)
    # the network input has unit variance for data of variance σ_d²
    torch.testing.assert_close(c_in**2 * (d**2 + s**2), torch.ones_like(s))
    # the effective training target (x0 − c_skip·(x0+σn))/c_out has unit variance (EDM eq. 8, App. B.6)
    target_var = ((1 - c_skip) ** 2 * d**2 + c_skip**2 * s**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(s))
    # λ(σ)·c_out² = 1: the effective loss weight on F is uniform over σ
    torch.testing.assert_close(edm_loss_weight(s) * c_out**2, torch.ones_like(s))


def test_zero_backbone_gives_c_skip_x_and_net_sees_c_in_x_and_c_noise():
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    net = ZeroNet()
    d = EDMPrecond(net)(x, SIGMAS)
    c_skip, _, c_in, c_noise = edm_scalings(SIGMAS)
    torch.testing.assert_close(d, append_dims(c_skip, 4) * x)
    torch.testing.assert_close(net.seen[0], append_dims(c_in, 4) * x)
    torch.testing.assert_close(net.seen[1], c_noise)


def test_precond_applies_c_out():
    x = torch.randn(6, 5, dtype=torch.float64)
    d = EDMPrecond(LinearNet())(x, SIGMAS)
    c_skip, c_out, c_in, c_noise = edm_scalings(SIGMAS)
    want = c_skip[:, None] * x + c_out[:, None] * (3 * c_in[:, None] * x + c_noise[:, None])
    torch.testing.assert_close(d, want)


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 40.0])
def test_zero_backbone_is_the_exact_denoiser_of_gaussian_data_with_std_sigma_data(sigma):
    # For x0 ~ N(0, σ_d² I): E[x0|x] = σ_d²/(σ_d²+σ²)·x = c_skip·x, i.e. the optimal F is 0.
    gauss = GaussianMixture([1.0], torch.zeros(1, 4), torch.full((1,), SIGMA_DATA**2))
    x = torch.randn(16, 4, dtype=torch.float64) * math.sqrt(SIGMA_DATA**2 + sigma**2)
    torch.testing.assert_close(EDMPrecond(ZeroNet())(x, sigma), gauss.denoise(x, sigma))


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_optimal_denoiser_attains_weighted_mmse_one_per_dimension(sigma):
    # EDM loss of the optimal denoiser for N(0, σ_d² I) data: λ(σ)·σ_d²σ²/(σ_d²+σ²) = 1 per dim.
    gen = torch.Generator().manual_seed(0)
    n, dim = 20000, 4
    gauss = GaussianMixture([1.0], torch.zeros(1, dim), torch.full((1,), SIGMA_DATA**2))
    x0 = gauss.sample(n, gen, dtype=torch.float64)
    noise = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    per = edm_loss(gauss.denoiser(), x0, sigma=torch.full((n,), sigma, dtype=torch.float64),
                   noise=noise, reduce=False) / dim
    se = per.std() / math.sqrt(n)
    assert abs(per.mean() - 1) < 4 * se, (per.mean(), se)
    # and it beats any perturbation D + δ·x (the conditional mean minimises the L2 risk)
    class Perturbed(nn.Module):
        def __init__(self, delta):
            super().__init__()
            self.delta = delta

        def forward(self, x, s, labels=None):
            return gauss.denoise(x, s) + self.delta * x

    sig = torch.full((n,), sigma, dtype=torch.float64)
    for delta in (-0.05, 0.05):
        assert edm_loss(Perturbed(delta), x0, sigma=sig, noise=noise) / dim > per.mean()


def test_edm_loss_reduce_and_sigma_sampling():
    gen = torch.Generator().manual_seed(1)
    s = sample_edm_sigma(50000, generator=gen)
    assert abs(s.log().mean() + 1.2) < 0.03 and abs(s.log().std() - 1.2) < 0.03
    x0 = torch.randn(8, 3)
    per = edm_loss(EDMPrecond(ZeroNet()), x0, reduce=False)
    assert per.shape == (8,) and (per >= 0).all()


def test_karras_grid_endpoints_monotone_length():
    s = karras_sigmas(18)
    assert s.shape == (19,) and s.dtype == torch.float32
    assert s[0].item() == pytest.approx(80.0, rel=1e-6)
    assert s[-2].item() == pytest.approx(0.002, rel=1e-5)
    assert s[-1].item() == 0.0
    assert (s[1:] < s[:-1]).all()
    # closed form at an interior point
    i, n = 5, 18
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    assert s[i].item() == pytest.approx((a + i / (n - 1) * (b - a)) ** 7, rel=1e-6)
    assert karras_sigmas(1).tolist() == [80.0, 0.0]
    assert karras_sigmas(5, append_zero=False).shape == (5,)
    with pytest.raises(ValueError):
        karras_sigmas(0)


def test_karras_ramp_endpoints():
    t = torch.tensor([0.0, 0.8, 1.0], dtype=torch.float64)
    s = karras_ramp(t)
    assert s[0].item() == pytest.approx(0.002, rel=1e-9)
    assert s[1].item() == pytest.approx(24.37, abs=0.05)  # SiD's σ at t_max = 800/1000
    assert s[2].item() == pytest.approx(80.0, rel=1e-9)
    # the ramp passes through the Karras grid: σ_i = ramp(1 − i/(n−1))
    n = 18
    grid = karras_sigmas(n, append_zero=False).double()
    torch.testing.assert_close(karras_ramp(1 - torch.arange(n, dtype=torch.float64) / (n - 1)), grid,
                               rtol=1e-6, atol=0)
