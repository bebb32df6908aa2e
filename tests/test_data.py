"""fewstep.data: built-in datasets, user files, affine maps, splits, batch streams."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewstep.config import from_dict, to_dict
from fewstep.data import DATASETS, Affine, Dataset, from_arrays, infinite_batches, load_dataset
from fewstep.errors import FewstepError

POINT_SETS = ["checkerboard", "swissroll", "moons"]
MIXTURE_SETS = {"8gaussians": 8, "25gaussians": 25}


def _rows(x: torch.Tensor) -> set:
    return {r.numpy().tobytes() for r in x.reshape(x.shape[0], -1)}


# --- built-in datasets ------------------------------------------------------------------
@pytest.mark.parametrize("name", POINT_SETS)
def test_point_sets_standardised(name):
    ds = load_dataset(name, n=4000)
    assert ds.kind == "points" and ds.sample_shape == (2,) and len(ds) == 4000
    assert ds.x.dtype == torch.float32
    assert ds.x.mean(0).abs().max() < 0.05
    assert (ds.x.std(0) - 0.5).abs().max() < 0.05
    assert (ds.labels is None) == (ds.num_classes == 0)
    assert torch.equal(load_dataset(name, n=4000).x, ds.x)          # same seed → same draw
    assert not torch.equal(load_dataset(name, n=4000, seed=1).x, ds.x)
    raw = ds.from_model(ds.x)
    assert torch.allclose(ds.to_model(raw), ds.x, atol=1e-5)


@pytest.mark.parametrize("name,k", MIXTURE_SETS.items())
def test_mixture_sets(name, k):
    mixture = pytest.importorskip("fewstep.diffusion.mixture")
    ds = load_dataset(name, n=3000)
    assert ds.kind == "points" and ds.sample_shape == (2,) and ds.num_classes == k
    assert ds.labels.min() >= 0 and ds.labels.max() < k
    assert torch.equal(ds.from_model(ds.x), ds.x)                  # identity affine
    ref, comp = mixture.preset({"8gaussians": "ring8", "25gaussians": "grid25"}[name]).sample(
        3000, generator=torch.Generator().manual_seed(0), return_components=True)
    assert torch.allclose(ds.x, torch.as_tensor(ref, dtype=torch.float32))
    assert torch.equal(ds.labels, torch.as_tensor(comp).long())
    assert _rows(ds.x).isdisjoint(_rows(load_dataset(name, split="test", n=3000).x))


def test_any_mixture_preset():
    mixture = pytest.importorskip("fewstep.diffusion.mixture")
    if "mix16d" not in mixture.PRESETS:
        pytest.skip("no 16-D preset")
    ds = load_dataset("mixture:mix16d", n=500)
    assert ds.sample_shape == (16,) and ds.num_classes == mixture.preset("mix16d").num_components
    with pytest.raises(FewstepError, match="preset"):
        load_dataset("mixture:nope")


@pytest.mark.parametrize("name,shape,n_train,n_test", [("digits", (1, 8, 8), 1497, 300),
                                                       ("mnist5k", (1, 28, 28), 4000, 1000)])
def test_image_sets(name, shape, n_train, n_test):
    tr, te, al = (load_dataset(name, split=s) for s in ("train", "test", "all"))
    assert (len(tr), len(te), len(al)) == (n_train, n_test, n_train + n_test)
    for ds in (tr, te):
        assert ds.kind == "images" and ds.sample_shape == shape and ds.num_classes == 10
        assert ds.x.dtype == torch.float32 and ds.labels.dtype == torch.long
        assert ds.x.min() == -1.0 and ds.x.max() == 1.0
    counts = te.class_counts()
    assert sum(counts) == n_test and max(counts) - min(counts) <= 2        # stratified
    # train and test partition the source (as multisets: digits holds duplicate images)
    from fewstep.data.images import digits_raw, mnist5k_raw
    src = (digits_raw if name == "digits" else mnist5k_raw)()[0]
    parts = tr.from_model(torch.cat([tr.x, te.x])).mul(255).round().to(torch.uint8)
    assert sorted(r.numpy().tobytes() for r in parts.reshape(len(al), -1)) == \
        sorted(r.tobytes() for r in (np.asarray(src) * 255).round().astype(np.uint8).reshape(len(al), -1))
    assert torch.equal(load_dataset(name, split="test", seed=5).x, te.x)   # fixed, seed-independent
    img = tr.from_model(tr.x[:4])
    assert img.min() >= 0 and img.max() <= 1
    assert torch.allclose(tr.to_model(img), tr.x[:4], atol=1e-6)
    assert torch.equal(load_dataset(name, n=10).x, tr.x[:10])


def test_split_indices_disjoint_and_deterministic():
    from fewstep.data import stratified_split
    labels = torch.arange(1000) % 7
    tr, te = stratified_split(1000, 150, labels, seed=0)
    tr2, te2 = stratified_split(1000, 150, labels, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert len(set(tr.tolist()) & set(te.tolist())) == 0 and len(tr) + len(te) == 1000
    assert set(torch.bincount(labels[te]).tolist()) <= {21, 22}      # 150 / 7 per class


def test_registry_and_unknown_name():
    assert set(DATASETS) >= {"8gaussians", "25gaussians", "checkerboard", "swissroll", "moons",
                             "digits", "mnist5k"}
    assert all(isinstance(v, str) and v for v in DATASETS.values())
    with pytest.raises(FewstepError, match="mnist5k") as e:
        load_dataset("mnist")
    assert "Did you mean" in str(e.value) and "digits" in str(e.value)
    with pytest.raises(FewstepError, match="not found"):
        load_dataset("/no/such/file.npy")
    with pytest.raises(FewstepError, match="split"):
        load_dataset("moons", split="val")
    with pytest.raises(FewstepError, match="n must"):
        load_dataset("moons", n=0)


def test_describe_and_meta():
    ds = load_dataset("digits", split="test")
    text = ds.describe()
    assert "300" in text and "10 classes" in text and "[0, 1]" in text
    meta = json.loads(json.dumps(ds.meta()))
    aff = from_dict(Affine, meta["affine"])
    assert aff == ds.affine and meta["sample_shape"] == [1, 8, 8]


def test_dataset_split_method():
    ds = load_dataset("moons", n=1000)
    tr, te = ds.split(0.2)
    assert len(tr) == 800 and len(te) == 200
    assert _rows(tr.x).isdisjoint(_rows(te.x))
    assert te.class_counts() == [100, 100]
    tr2, _ = ds.split(0.2)
    assert torch.equal(tr.x, tr2.x)
    with pytest.raises(FewstepError):
        ds.split(1.5)


def test_affine_json_roundtrip():
    a = Affine(offset=[1.0, -2.0], scale=[0.5, 4.0])
    assert from_dict(Affine, json.loads(json.dumps(to_dict(a)))) == a
    x = torch.randn(5, 2)
    assert torch.allclose(a.from_model(a.to_model(x)), x, atol=1e-6)
    with pytest.raises(FewstepError):
        from_dict(Affine, {"offset": [0.0], "scale": [0.0]})


# --- user data --------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw"])
@pytest.mark.parametrize("rng", ["uint8", "unit", "sym"])
def test_user_npy_images(tmp_path, layout, rng):
    g = np.random.default_rng(0)
    base = g.integers(0, 256, size=(20, 12, 10, 3 if layout != "nhw" else 1)).astype(np.uint8)
    base[0, 0, 0, 0], base[0, 0, 1, 0] = 0, 255                          # span the full range
    arr = {"uint8": base, "unit": base / 255.0, "sym": base / 127.5 - 1}[rng]
    arr = {"nhwc": arr, "nchw": arr.transpose(0, 3, 1, 2), "nhw": arr[..., 0]}[layout]
    np.save(tmp_path / "imgs.npy", arr.astype(np.float32) if rng != "uint8" else arr)
    ds = load_dataset(str(tmp_path / "imgs.npy"), split="all")
    c = 1 if layout == "nhw" else 3
    assert ds.kind == "images" and ds.sample_shape == (c, 12, 10) and len(ds) == 20
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    want = base.transpose(0, 3, 1, 2)[:, :c]
    got = ds.from_model(ds.x).mul(255).round().to(torch.uint8).numpy()
    assert sorted(r.tobytes() for r in got) == sorted(r.tobytes() for r in want)   # same images, any order
    note = " ".join(ds.notes)
    assert {"uint8": "[0, 255]", "unit": "[0, 1]", "sym": "[-1, 1]"}[rng] in note


def test_user_npy_points_and_split(tmp_path):
    g = np.random.default_rng(0)
    pts = g.normal(loc=[10.0, -3.0, 0.0], scale=[5.0, 0.1, 1.0], size=(500, 3))
    np.save(tmp_path / "p.npy", pts)
    tr = load_dataset(tmp_path / "p.npy")
    te = load_dataset(tmp_path / "p.npy", split="test")
    al = load_dataset(tmp_path / "p.npy", split="all")
    assert (len(tr), len(te), len(al)) == (450, 50, 500)
    assert al.x.mean(0).abs().max() < 1e-5 and (al.x.std(0, unbiased=False) - 0.5).abs().max() < 1e-4
    assert _rows(tr.x).isdisjoint(_rows(te.x))
    back = al.from_model(al.x).double().numpy()
    assert np.allclose(np.sort(back, 0), np.sort(pts, 0), atol=1e-4)


def test_user_npz_with_labels(tmp_path):
    x = np.random.default_rng(0).random((40, 1, 8, 8)).astype(np.float32)
    y = np.array(["cat", "dog"] * 20)
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    ds = load_dataset(tmp_path / "d.npz", split="all")
    assert ds.num_classes == 2 and ds.class_names == ["cat", "dog"]
    assert ds.class_counts() == [20, 20]
    np.savez(tmp_path / "p.npz", points=np.random.default_rng(1).normal(size=(30, 16)), y=np.arange(30) % 3)
    ds = load_dataset(tmp_path / "p.npz", split="all")
    assert ds.kind == "points" and ds.sample_shape == (16,) and ds.num_classes == 3 and ds.class_names is None


def test_image_folder(tmp_path):
    from PIL import Image
    g = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "lab" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(g.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(tmp_path / "lab" / cls / f"{i}.png")
    (tmp_path / "flat").mkdir()
    for i in range(4):
        Image.fromarray(g.integers(0, 256, (9, 7), dtype=np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    ds = load_dataset(tmp_path / "lab", split="all")
    assert ds.sample_shape == (3, 9, 7) and ds.num_classes == 2 and ds.class_names == ["a", "b"]
    assert ds.class_counts() == [6, 6]
    assert len(load_dataset(tmp_path / "lab", split="test")) == 1
    flat = load_dataset(tmp_path / "flat", split="all")
    assert flat.sample_shape == (1, 9, 7) and flat.labels is None and len(flat) == 4
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "flat" / "odd.png")
    with pytest.raises(FewstepError, match="different sizes"):
        load_dataset(tmp_path / "flat")
    with pytest.raises(FewstepError, match="too few"):
        load_dataset(tmp_path / "lab" / "a", split="test")


@pytest.mark.parametrize("arr,match", [
    (np.zeros((0, 2)), "empty"),
    (np.zeros((5,)), "1-D"),
    (np.full((10, 2), np.nan), "NaN"),
    (np.zeros((2, 3, 4, 5, 6)), "5-D"),
    (np.zeros((4, 7, 7, 7)), "channel axis"),
    (np.full((4, 8, 8), 1000.0), r"\[0, 1\], \[-1, 1\]"),
    (np.array([[1, 2], [3, 4]], dtype=object), "numeric"),
])
def test_bad_arrays(tmp_path, arr, match):
    with pytest.raises(FewstepError, match=match):
        from_arrays("bad", arr)


def test_bad_files(tmp_path):
    np.savez(tmp_path / "k.npz", foo=np.zeros((3, 2)))
    with pytest.raises(FewstepError, match="x.*images.*points"):
        load_dataset(tmp_path / "k.npz")
    np.savez(tmp_path / "l.npz", x=np.zeros((3, 2)), labels=np.zeros(4))
    with pytest.raises(FewstepError, match="one entry per item"):
        load_dataset(tmp_path / "l.npz")
    (tmp_path / "t.txt").write_text("hi")
    with pytest.raises(FewstepError, match="supported"):
        load_dataset(tmp_path / "t.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FewstepError, match="no image files"):
        load_dataset(tmp_path / "empty")


def test_dataset_validation():
    with pytest.raises(FewstepError):
        Dataset("x", torch.zeros(3, 2, dtype=torch.float64), None, 0, "points", Affine.identity(2))
    with pytest.raises(FewstepError):
        Dataset("x", torch.zeros(3, 2), None, 0, "voxels", Affine.identity(2))


# --- batch stream -----------------------------------------------------------------------
def test_infinite_batches_reproducible_and_resumable():
    ds = load_dataset("moons", n=100)
    a = infinite_batches(ds, 32, torch.Generator().manual_seed(3))
    b = infinite_batches(ds, 32, torch.Generator().manual_seed(3))
    first = [next(a) for _ in range(10)]                     # crosses several epochs
    for (xa, ya), (xb, yb) in zip(first, (next(b) for _ in range(10))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (32, 2)
    # one epoch covers every item exactly once
    c = infinite_batches(ds, 25, torch.Generator().manual_seed(0))
    idx = torch.cat([c.next_indices() for _ in range(4)])
    assert sorted(idx.tolist()) == list(range(100))
    # resume: a fresh iterator with a different generator continues the same stream
    state = json.loads(json.dumps(a.state_dict()))
    expect = [next(a) for _ in range(5)]
    r = infinite_batches(ds, 32, torch.Generator().manual_seed(999))
    r.load_state_dict(state)
    for (xe, ye), (xr, yr) in zip(expect, (next(r) for _ in range(5))):
        assert torch.equal(xe, xr) and torch.equal(ye, yr)
    assert r.items_seen == a.items_seen == 15 * 32


def test_infinite_batches_small_dataset_and_errors():
    ds = load_dataset("checkerboard", n=5)
    it = infinite_batches(ds, 8, torch.Generator().manual_seed(0))
    x, y = next(it)
    assert x.shape == (8, 2) and y is None
    with pytest.raises(FewstepError):
        infinite_batches(ds, 0)
    other = infinite_batches(load_dataset("checkerboard", n=6), 8)
    with pytest.raises(FewstepError, match="same dataset"):
        other.load_state_dict(it.state_dict())


def test_sixteen_bit_image_files_are_read_as_0_to_65535_however_dark(tmp_path):
    from PIL import Image

    for i, v in enumerate((100, 150, 200, 40000)):
        Image.fromarray(np.full((6, 6), v, dtype=np.uint16)).save(tmp_path / f"{i}.png")
    assert Image.open(tmp_path / "0.png").mode.startswith("I;16")
    ds = load_dataset(tmp_path, split="all")
    raw = ds.from_model(ds.x).flatten(1)[:, 0].sort().values
    torch.testing.assert_close(raw, torch.tensor([100, 150, 200, 40000]) / 65535.0, rtol=1e-5, atol=1e-6)
    (tmp_path / "3.png").unlink()  # a dark set alone (max ≤ 255) is still 16-bit, not 8-bit
    dark = load_dataset(tmp_path, split="all")
    torch.testing.assert_close(dark.from_model(dark.x).flatten(1)[:, 0].sort().values,
                               torch.tensor([100, 150, 200]) / 65535.0, rtol=1e-5, atol=1e-6)


def test_subset_takes_a_boolean_mask_and_to_model_reads_integer_pixels_by_dtype():
    ds = load_dataset("digits", split="test")
    mask = ds.labels == 3
    sub = ds.subset(mask)
    assert len(sub) == int(mask.sum()) > 2 and torch.equal(sub.x, ds.x[mask]) and set(sub.labels.tolist()) == {3}
    px = torch.tensor([0, 128, 255]).reshape(1, 1, 1, 3)
    want = ds.to_model(px.to(torch.uint8))
    torch.testing.assert_close(want.flatten(), torch.tensor([-1.0, 2 * 128 / 255 - 1, 1.0]))
    torch.testing.assert_close(ds.to_model((px * 257).to(torch.uint16)), want)  # by dtype, not by value
    with pytest.raises(FewstepError, match="no known range"):  # int64 0..255 or 0..65535? not from one batch
        ds.to_model(px)
