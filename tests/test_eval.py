"""Tests for fewstep.eval: metrics, mixture measures, feature nets, the front door and plots."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.eval import metrics as M
from fewstep.eval.evaluate import evaluate_samples, fd_floor, quantize_images
from fewstep.eval.feature_net import (
    FeatureNet,
    FeatureNetConfig,
    asset_paths,
    load_feature_net,
    random_shift,
    train_feature_net,
)
from fewstep.eval.plots import plot_curves, save_comparison_grid, save_image_grid, save_scatter


def gauss(n, d=8, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def clusters(n, centres, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(centres), (n,), generator=g)
    return centres[idx] + std * torch.randn(n, centres.shape[1], generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- Fréchet / KID


def test_fd_of_a_set_with_itself_is_zero():
    a = gauss(1000)
    assert abs(M.frechet_distance(a, a)) < 1e-6


def test_fd_equals_squared_mean_shift_for_equal_covariances():
    a = gauss(1000, d=16)
    for shift in (0.1, 0.5, 2.0):
        delta = torch.zeros(16, dtype=torch.float64)
        delta[:4] = shift
        fd = M.frechet_distance(a, a + delta)
        assert fd == pytest.approx(float(delta.square().sum()), rel=1e-4, abs=1e-6)


def test_fd_grows_monotonically_with_mean_shift():
    a, b = gauss(1000, seed=0), gauss(1000, seed=1)
    fds = [M.frechet_distance(a, b + s) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert all(x < y for x, y in zip(fds, fds[1:]))
    assert fds[0] < 0.2  # two draws of the same distribution: only finite-sample bias


def test_fd_rejects_bad_input():
    with pytest.raises(FewstepError):
        M.frechet_distance(gauss(10, d=4), gauss(10, d=5))
    with pytest.raises(FewstepError):
        M.frechet_distance(gauss(1), gauss(10))
    bad = gauss(10)
    bad[0, 0] = float("nan")
    with pytest.raises(FewstepError):
        M.frechet_distance(bad, gauss(10))


def test_kid_near_zero_for_identical_distributions_and_grows_with_shift():
    a, b = gauss(600, seed=0), gauss(600, seed=1)
    same, std = M.kernel_inception_distance(a, b, subsets=20, subset_size=300)
    shifted, _ = M.kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=300)
    assert abs(same) < 0.01 and std >= 0
    assert shifted > 20 * max(abs(same), 1e-3)
    # deterministic given the seed
    assert M.kernel_inception_distance(a, b, subsets=5, subset_size=100, seed=3) == \
        M.kernel_inception_distance(a, b, subsets=5, subset_size=100, seed=3)


# ----------------------------------------------------------------------------- precision / recall


def test_precision_recall_identical_sets_is_one():
    a = gauss(500)
    assert M.precision_recall(a, a, k=3) == (1.0, 1.0)
    p, r = M.precision_recall(a, gauss(500, seed=1), k=3)
    assert p > 0.8 and r > 0.8


def test_recall_drops_for_a_mode_dropped_set():
    centres = 4.0 * torch.eye(8, dtype=torch.float64)[:4]
    real = clusters(800, centres, seed=0)
    full = clusters(800, centres, seed=1)
    dropped = clusters(800, centres[:2], seed=2)
    p_full, r_full = M.precision_recall(real, full)
    p_drop, r_drop = M.precision_recall(real, dropped)
    assert r_full > 0.8 and p_full > 0.8
    assert p_drop > 0.8  # what it generates is still real-looking
    assert r_drop < 0.6  # but half the modes are missing


def test_class_histogram_and_uniform_deviation():
    logits = torch.nn.functional.one_hot(torch.arange(100) % 10, 10).float()
    h = M.class_histogram(logits)
    assert torch.allclose(h, torch.full((10,), 0.1, dtype=torch.float64))
    assert M.max_uniform_deviation(h) == pytest.approx(0.0)
    one = M.class_histogram(torch.nn.functional.one_hot(torch.zeros(50, dtype=torch.long), 10).float())
    assert M.max_uniform_deviation(one) == pytest.approx(9.0)


# ----------------------------------------------------------------------------- mixtures


@pytest.fixture(scope="module")
def ring():
    from fewstep.diffusion.mixture import preset

    return preset("ring8")


def test_mixture_metrics_true_samples_cover_all_modes(ring):
    x = ring.sample(1000, generator=torch.Generator().manual_seed(1))
    m = M.mixture_metrics(x, ring)
    assert m["mode_coverage"] == 1.0
    assert m["balance_tv"] < 0.06
    assert abs(m["log_likelihood"] - m["ref_log_likelihood"]) < 0.15
    assert abs(m["mmd_rbf"]) < 5e-3
    assert m["n"] == m["n_reference"] == 1000
    json.dumps(m)  # JSON-ready


def test_mixture_metrics_single_mode_has_low_coverage_and_poor_balance(ring):
    x, comp = ring.sample(3000, generator=torch.Generator().manual_seed(2), return_components=True)
    one = x[comp == 0]
    m = M.mixture_metrics(one, ring)
    assert m["mode_coverage"] == pytest.approx(1 / 8)
    assert m["balance_tv"] == pytest.approx(7 / 8, abs=0.01)
    good = M.mixture_metrics(x[: one.shape[0]], ring)
    assert m["mmd_rbf"] > 10 * abs(good["mmd_rbf"]) and m["sliced_wasserstein"] > 3 * good["sliced_wasserstein"]


def test_mixture_log_likelihood_true_beats_shifted(ring):
    x = ring.sample(1000, generator=torch.Generator().manual_seed(3))
    true = M.mixture_metrics(x, ring)
    shifted = M.mixture_metrics(x + 0.1, ring)
    assert true["log_likelihood"] > shifted["log_likelihood"] + 1.0
    assert shifted["sliced_wasserstein"] > true["sliced_wasserstein"]


def test_mixture_metrics_drop_nonfinite_samples(ring):
    x = ring.sample(500, generator=torch.Generator().manual_seed(4))
    x[:50] = float("nan")
    m = M.mixture_metrics(x, ring)
    assert m["nonfinite_fraction"] == pytest.approx(0.1) and m["n"] == 450


def test_sliced_wasserstein_and_mmd_basic():
    a, b = gauss(400, d=3, seed=0), gauss(400, d=3, seed=1)
    assert M.sliced_wasserstein(a, a) == 0.0
    # a pure translation by t along every direction: SW² = E_θ (θ·t)² = |t|²/D
    t = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    sw = M.sliced_wasserstein(a, a + t, n_projections=4000)
    assert sw == pytest.approx(math.sqrt(1 / 3), rel=0.05)
    # unequal sizes go through the quantile path
    assert M.sliced_wasserstein(a, b[:250]) < 0.3
    mmd_same, h = M.rbf_mmd2(a, b)
    mmd_far, _ = M.rbf_mmd2(a, b + 2)
    assert abs(mmd_same) < 0.01 < mmd_far and h > 0


# ----------------------------------------------------------------------------- feature nets


@pytest.mark.parametrize("name,size", [("digits", 8), ("mnist5k", 28)])
def test_shipped_feature_net_loads_and_reaches_documented_accuracy(name, size):
    from fewstep.data import load_dataset

    net = load_feature_net(name)
    info = net.info
    assert info["test_accuracy"] >= 0.97
    for key in ("command", "seed", "train_seconds", "config", "n_test"):
        assert key in info
    assert net.name == f"{name}-featnet" and net.config.image_size == size
    test = load_dataset(name, split="test").take(300)
    logits, feats = net.extract(test.x)
    assert feats.shape == (300, net.config.feature_dim)
    acc = float((logits.argmax(1) == test.labels).float().mean())
    assert acc >= 0.97 and acc >= info["test_accuracy"] - 0.03


def test_missing_feature_net_raises_fewstep_error_naming_the_command(tmp_path):
    with pytest.raises(FewstepError, match="python -m fewstep.eval.feature_net --dataset nosuchset"):
        load_feature_net("nosuchset")
    with pytest.raises(FewstepError, match="not found"):
        load_feature_net(tmp_path / "absent.safetensors")


def test_feature_net_shapes_and_input_check():
    for size in (8, 28):
        net = FeatureNet(FeatureNetConfig(image_size=size)).eval()
        logits, feats = net(torch.randn(3, 1, size, size))
        assert logits.shape == (3, 10) and feats.shape == (3, 128)
    with pytest.raises(FewstepError, match="expects images of shape"):
        net.extract(torch.randn(2, 1, 8, 8))


def test_random_shift_moves_pixels_and_fills_background():
    x = -torch.ones(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    y = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    assert torch.all((y == 1).sum(dim=(1, 2, 3)) == 4)  # the blob stays whole (it is away from the border)
    assert not torch.equal(x, y)
    centres = torch.stack([torch.nonzero(img[0] == 1).float().mean(0) for img in y])
    assert (centres - 3.5).abs().max() <= 1.0


def test_train_feature_net_round_trip(tmp_path):
    out = tmp_path / "tiny.safetensors"
    net, meta = train_feature_net("digits", epochs=1, seed=1, out_path=out, verbose=False,
                                  config=FeatureNetConfig(image_size=8, widths=(8, 8, 16), feature_dim=16))
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and "--seed 1" in meta["command"] and "custom" in meta["command"]
    loaded = load_feature_net(out)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert torch.allclose(loaded.extract(x)[1], net.extract(x)[1], atol=1e-6)
    assert json.loads(out.with_suffix(".json").read_text())["seed"] == 1


# ----------------------------------------------------------------------------- front door


def test_evaluate_samples_images_real_beats_noise():
    from fewstep.data import load_dataset

    real = load_dataset("digits", split="test").x
    good = evaluate_samples(real, dataset="digits")
    noise = evaluate_samples(torch.rand(300, 1, 8, 8) * 2 - 1, dataset="digits")
    key = "fd_digits-featnet"
    assert good["feature_net"] == "digits-featnet" and good["n"] == good["n_reference"] == 300
    assert good[key] < 0.2 * noise[key]
    assert good["precision_digits-featnet"] > 0.7 and good["recall_digits-featnet"] > 0.7
    assert good["class_max_dev_digits-featnet"] < 0.3
    assert len(good["class_hist_digits-featnet"]) == 10
    floor = fd_floor("digits", 300)
    assert floor == pytest.approx(good[key], rel=1e-6)  # same protocol, same images
    json.dumps(good)
    labelled = evaluate_samples(real, dataset="digits", labels=load_dataset("digits", split="test").labels)
    assert labelled["label_accuracy_digits-featnet"] > 0.97


def test_evaluate_samples_images_drops_nonfinite_and_checks_shapes():
    x = torch.rand(100, 1, 8, 8) * 2 - 1
    x[:10] = float("nan")
    out = evaluate_samples(x, dataset="digits")
    assert out["n"] == 90 and out["nonfinite_fraction"] == pytest.approx(0.1)
    with pytest.raises(FewstepError, match="expects images of shape"):
        evaluate_samples(torch.zeros(20, 1, 28, 28), dataset="digits")
    with pytest.raises(FewstepError):
        fd_floor("digits", 10_000)


def test_evaluate_samples_mixture(ring):
    x = ring.sample(500, generator=torch.Generator().manual_seed(5))
    out = evaluate_samples(x, mixture=ring)
    assert out["kind"] == "mixture" and out["mode_coverage"] == 1.0
    json.dumps(out)


def test_quantize_images():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.3, 1.0, 5.0])
    q = quantize_images(x)
    assert q.min() == -1 and q.max() == 1
    assert torch.allclose((q + 1) * 127.5, ((q + 1) * 127.5).round())


# ----------------------------------------------------------------------------- plots


def test_plots_write_nonempty_pngs(tmp_path):
    imgs = torch.rand(10, 1, 8, 8) * 2 - 1
    paths = [
        save_image_grid(imgs, tmp_path / "a" / "grid.png", nrow=5),
        save_image_grid(torch.rand(4, 3, 16, 16) * 2 - 1, tmp_path / "rgb.png"),
        save_scatter(torch.randn(200, 3), tmp_path / "scatter.png", reference=torch.randn(200, 3), title="t"),
        plot_curves({"sid": ([1, 2, 4], [10.0, 5.0, 2.0]), "pd": ([1, 2], [9.0, 8.0])}, tmp_path / "c.png",
                    "kimg", "FD", logy=True),
        save_comparison_grid({"teacher": imgs, "student": -imgs}, tmp_path / "cmp.png"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 200
    with pytest.raises(FewstepError):
        save_image_grid(torch.zeros(2, 2, 8, 8), tmp_path / "bad.png")


def test_asset_paths_are_inside_the_package():
    w, j = asset_paths("mnist5k")
    assert w.parent.name == "feature_nets" and j.suffix == ".json"


def test_evaluate_samples_points_without_mixture():
    from fewstep.data import load_dataset

    real = load_dataset("moons", split="test", n=500).x
    good = evaluate_samples(real, dataset="moons")
    bad = evaluate_samples(real + 0.5, dataset="moons")
    assert good["kind"] == "points" and good["n"] == 500
    assert bad["mmd_rbf"] > 10 * abs(good["mmd_rbf"]) and bad["sliced_wasserstein"] > good["sliced_wasserstein"]


def test_table_columns_state_the_floors_n_and_images_without_a_feature_net_lead_with_inception():
    from fewstep.eval.tables import columns, metric_kind, primary_metric

    m = {"kind": "images", "fd_digits-featnet": 0.63, "fd_digits-featnet_at_floor_n": 1.83,
         "fd_floor_digits-featnet": 0.71, "n_floor": 300, "n": 1000}
    heads = [h for h, _ in columns(m)]
    assert heads[:3] == ["FD (digits-featnet)", "FD at n = 300", "FD floor (n = 300)"]  # the floor beside its own n
    inception = {"fid_inception": 12.5, "kid_inception": 0.01, "precision_inception": 0.7}
    assert metric_kind(inception) == "images" and primary_metric(inception) == ("fid_inception", 12.5, False)
    assert [k for _, k in columns(inception)][:2] == ["fid_inception", "kid_inception"]


def test_point_samples_that_are_all_non_finite_are_a_clear_error():
    with pytest.raises(FewstepError, match="need >= 2 finite samples"):
        evaluate_samples(torch.full((50, 2), float("nan")), dataset="moons")
