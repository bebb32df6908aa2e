"""The mathematics of SiD, Diff-Instruct and DMD (DESIGN §3, seed 003), tested against
the score identity, exact gradient decompositions and closed forms."""
import math

import pytest
import torch

from fewstep.diffusion.mixture import GaussianMixture
from fewstep.methods.diff_instruct import diff_instruct_generator_loss, diff_instruct_loss
from fewstep.methods.dmd import dmd_generator_loss, dmd_grad, dmd_loss
from fewstep.methods.fake_score import generator_sigma
from fewstep.methods.sid import pooled_weight, sid_generator_loss, sid_loss, sid_weight



@pytest.fixture(autouse=True)
def _float64():
    """These identities are checked in float64; restore the default for other modules."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mix(shift=0.0, scale=1.0):
    means = torch.tensor([[-0.6, 0.1], [0.5, -0.2], [0.0, 0.7]]) * scale + shift
    return GaussianMixture([0.3, 0.5, 0.2], means, torch.tensor([0.04, 0.02, 0.05]))


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_score_identity_holds_with_exact_fake_score(sigma):
    """E[(f_φ−f_ψ)·(f_φ−x_g)] = E[‖f_φ−f_ψ‖²] when f_ψ is the exact denoiser of p_g (seed 003)."""
    g = torch.Generator().manual_seed(0)
    p_data, p_gen = _mix(), _mix(shift=0.15, scale=0.8)
    teacher, fake = p_data.denoiser(), p_gen.denoiser()
    n = 200_000
    x_g = p_gen.sample(n, generator=g)
    x_t = x_g + sigma * torch.randn(x_g.shape, generator=g)
    s = torch.full((n,), sigma)
    y_r, y_f = teacher(x_t, s), fake(x_t, s)
    lhs = ((y_r - y_f) * (y_r - x_g)).sum(1)
    rhs = ((y_r - y_f) ** 2).sum(1)
    diff = lhs - rhs
    se = diff.std() / math.sqrt(n)
    assert rhs.mean() > 20 * se  # the quantity itself is far from zero
    assert abs(diff.mean()) < 4 * se, (diff.mean(), se)
    # and the identity fails when f_ψ is not p_g's denoiser: the test can fail
    wrong = _mix(shift=-0.1, scale=0.9).denoiser()(x_t, s)
    d2 = ((y_r - wrong) * (y_r - x_g)).sum(1) - ((y_r - wrong) ** 2).sum(1)
    assert abs(d2.mean()) > 6 * d2.std() / math.sqrt(n)


def test_alpha_special_cases():
    g = torch.Generator().manual_seed(1)
    x, yr, yf = (torch.randn(5, 3, 4, 4, generator=g) for _ in range(3))
    w = sid_weight(x, yr)
    torch.testing.assert_close(sid_loss(x, yr, yf, alpha=0.0), (yr - yf) * (yr - x) / w)
    torch.testing.assert_close(sid_loss(x, yr, yf, alpha=1.0), (yr - yf) * (yf - x) / w)
    # L2 − α·L1 structure: linear in α with slope −‖y_r−y_f‖²/ω
    torch.testing.assert_close(sid_loss(x, yr, yf, 1.2) - sid_loss(x, yr, yf, 0.0), -1.2 * (yr - yf) ** 2 / w)


def test_weight_is_detached_mean_abs_and_clipped():
    x = torch.zeros(2, 3, requires_grad=True)
    yr = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]])
    w = sid_weight(x, yr)
    torch.testing.assert_close(w.flatten(), torch.tensor([2.0, 1e-5]))
    assert not w.requires_grad


def test_sid_loss_partials_match_closed_form():
    """∂L/∂y_r = (y_r − x + (1−2α)(y_r−y_f))/ω, ∂L/∂y_f = (−(y_r − x) + 2α(y_r−y_f))/ω, ∂L/∂x = −(y_r−y_f)/ω."""
    g = torch.Generator().manual_seed(2)
    x, yr, yf = (torch.randn(4, 6, generator=g).requires_grad_() for _ in range(3))
    a = 1.2
    w = sid_weight(x, yr)
    sid_loss(x, yr, yf, a).sum().backward()
    d = (yr - yf).detach()
    torch.testing.assert_close(yr.grad, (yr.detach() - x.detach() + (1 - 2 * a) * d) / w)
    torch.testing.assert_close(yf.grad, (-(yr.detach() - x.detach()) + 2 * a * d) / w)
    torch.testing.assert_close(x.grad, -d / w)


def _linear_generator(dim=2, seed=3):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(dim, dim)
    return lin


def _grads(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_sid_gradient_minus_diff_instruct_is_the_network_input_terms():
    """SiD grad = (explicit x_g term, i.e. Diff-Instruct with weight 1/ω) + (terms through both networks' inputs)."""
    G = _linear_generator()
    params = list(G.parameters())
    teacher, fake = _mix().denoiser(), _mix(shift=0.2, scale=0.7).denoiser()
    g = torch.Generator().manual_seed(4)
    z = torch.randn(256, 2, generator=g)
    sigma = generator_sigma(256)
    noise = torch.randn(256, 2, generator=g)
    x_g = G(z)
    full, info = sid_generator_loss(x_g, teacher, fake, sigma=sigma, noise=noise, alpha=1.2)
    g_full = _grads(full.sum(), params)
    x_g = G(z)
    det, info_d = sid_generator_loss(x_g, teacher, fake, sigma=sigma, noise=noise, alpha=1.2, through_networks=False)
    g_det = _grads(det.sum(), params)
    # the detached SiD gradient is Diff-Instruct's (f_ψ − f_φ)·∂x_g/∂θ weighted by 1/ω
    x_g = G(z)
    w = sid_weight(x_g, info_d["y_real"])
    g_di = _grads(diff_instruct_loss(x_g, info_d["y_real"], info_d["y_fake"], weight=1 / w).sum(), params)
    torch.testing.assert_close(g_det, g_di)
    # the remainder is exactly the gradient through the networks' inputs (explicit x_g held fixed)
    x_g = G(z)
    x_t = x_g + sigma[:, None] * noise
    yr, yf = teacher(x_t, sigma), fake(x_t, sigma)
    net_terms = sid_loss(x_g.detach(), yr, yf, 1.2, weight=sid_weight(x_g, yr)).sum()
    g_net = _grads(net_terms, params)
    torch.testing.assert_close(g_full, g_det + g_net)
    assert g_net.norm() > 0.1 * g_full.norm()  # the network terms matter


def test_sid_gradient_vanishes_when_fake_equals_teacher_and_student_is_data():
    """Student = data distribution and fake = teacher → zero generator gradient."""
    p = _mix()
    # the same distribution represented by a permuted mixture: a different code path
    q = GaussianMixture(p.weights[[2, 0, 1]], p.means[[2, 0, 1]], p.covs[[2, 0, 1]])
    teacher, fake = p.denoiser(), q.denoiser()
    G = _linear_generator()
    x_g = G(torch.randn(128, 2))
    per, _ = sid_generator_loss(x_g, teacher, fake, alpha=1.2)
    grads = torch.autograd.grad(per.sum(), list(G.parameters()))
    assert max(g.abs().max() for g in grads) < 1e-9
    # and not when the fake differs
    per, _ = sid_generator_loss(G(torch.randn(128, 2)), teacher, _mix(shift=0.1).denoiser(), alpha=1.2)
    grads = torch.autograd.grad(per.sum(), list(G.parameters()))
    assert max(g.abs().max() for g in grads) > 1e-3


def _gaussian_denoiser(mean, var, dim):
    return GaussianMixture([1.0], torch.full((1, dim), float(mean)), torch.tensor([var])).denoiser()


@pytest.mark.parametrize("method", ["sid", "diff-instruct", "dmd"])
def test_population_gradient_points_toward_teacher(method):
    """32-D isotropic: teacher N(0, 0.25·I); generator x = a·z + b·1 with exact fake score N(b·1, a²I).
    Gradient descent must move b toward 0 and a toward 0.5 (the sign and direction of each loss).
    (Many dimensions, as in images: the per-sample normaliser ω is then nearly constant.)"""
    dim = 32
    teacher = _gaussian_denoiser(0.0, 0.25, dim)
    torch.manual_seed(5)
    for a0, b0 in [(0.3, 0.4), (0.8, -0.3)]:
        a = torch.tensor(a0, requires_grad=True)
        b = torch.tensor(b0, requires_grad=True)
        fake = _gaussian_denoiser(b0, a0**2, dim)
        z = torch.randn(20_000, dim)
        x_g = a * z + b
        if method == "sid":
            per, _ = sid_generator_loss(x_g, teacher, fake, alpha=1.2)
        elif method == "diff-instruct":
            per, _ = diff_instruct_generator_loss(x_g, teacher, fake)
        else:
            per, _ = dmd_generator_loss(x_g, teacher, fake)
        ga, gb = torch.autograd.grad(per.mean(), [a, b])
        assert gb * (b0 - 0.0) > 0, (method, a0, b0, gb)  # descending moves b toward 0
        assert ga * (a0 - 0.5) > 0, (method, a0, b0, ga)  # and a toward 0.5


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, generator=g, requires_grad=True)
    yr, yf = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    grad = dmd_grad(x, yr, yf)
    dmd_loss(x, grad).sum().backward()
    norm = (x.detach() - yr).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x.grad, (yf - yr) / norm)


def test_pooled_weight_is_the_mean_over_the_k_samples_nearest_in_sigma():
    g = torch.Generator().manual_seed(3)
    n, k = 37, 8
    sigma = torch.rand(n, generator=g) * 3
    w = torch.rand(n, 1, generator=g) + 0.1
    pooled = pooled_weight(w, sigma, k)
    order = torch.argsort(sigma)
    for rank, i in enumerate(order.tolist()):  # brute force: a window of k ranks, clamped to the batch
        lo = min(max(rank - k // 2, 0), n - k)
        torch.testing.assert_close(pooled[i], w[order[lo:lo + k]].mean(0))
    torch.testing.assert_close(pooled_weight(w, sigma, 1), w)  # 1: the reference's per-sample ω
    torch.testing.assert_close(pooled_weight(w, sigma, 10 * n), w.mean().expand_as(w))
    perm = torch.randperm(n, generator=g)  # a function of the batch as a set: rows just move
    torch.testing.assert_close(pooled_weight(w[perm], sigma[perm], k), pooled[perm])
    bad = w.clone()
    bad[order[5]] = float("nan")  # a NaN sample is dropped later: its neighbours pool over the rest
    p_bad = pooled_weight(bad, sigma, k)
    assert torch.isnan(p_bad[order[5]]) and torch.isfinite(p_bad[order[torch.arange(n) != 5]]).all()
    lo = min(max(0 - k // 2, 0), n - k)  # the lowest σ: its window holds the NaN
    torch.testing.assert_close(p_bad[order[0]], w[order[[i for i in range(lo, lo + k) if i != 5]]].mean(0))


def test_pooled_weight_tames_the_two_dimensional_weight_and_keeps_the_gradient_direction():
    """In 2-D the per-sample ω = σ·mean(|ε₁|, |ε₂|) nears 0 (1/ω has an infinite variance).
    Pooling over σ-neighbours shrinks the spread of the generator gradient across batches while
    the population gradient still moves the generator toward the teacher."""
    dim, a0, b0 = 2, 0.3, 0.4
    teacher, fake = _gaussian_denoiser(0.0, 0.25, dim), _gaussian_denoiser(b0, a0**2, dim)
    torch.manual_seed(6)
    grads = {1: [], 32: []}
    for _ in range(60):
        z, s, e = torch.randn(512, dim), generator_sigma(512), torch.randn(512, dim)
        for k in grads:
            a = torch.tensor(a0, requires_grad=True)
            b = torch.tensor(b0, requires_grad=True)
            per, _ = sid_generator_loss(a * z + b, teacher, fake, alpha=1.2, sigma=s, noise=e, omega_pool=k)
            grads[k].append(torch.stack(torch.autograd.grad(per.mean(), [a, b])))
    mean = {k: torch.stack(v).mean(0) for k, v in grads.items()}
    std = {k: torch.stack(v).std(0) for k, v in grads.items()}
    assert (std[32] < 0.5 * std[1]).all(), std
    ga, gb = mean[32]
    assert gb * b0 > 0 and ga * (a0 - 0.5) > 0, mean  # toward b = 0, a = 0.5

