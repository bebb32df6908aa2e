"""Inception FID from a local weights file: layout, loading, the clear error, the Fréchet path."""
import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.eval import inception as inc

# Keys and shapes of the standard FID weights (pt_inception-2015-12-05-6726825d.pth, torchvision
# Inception3 layout with num_classes=1008 and no aux classifier).
STANDARD = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights written in the standard layout (a plain state dict saved with torch.save)."""
    torch.manual_seed(0)
    net = inc.FIDInception()
    for m in net.modules():  # variance-preserving random weights, so features respond to their input
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    p = tmp_path_factory.mktemp("inc") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, p)
    return p, sd


def test_layout_matches_the_standard_file(weights):
    _, sd = weights
    for k, shape in STANDARD.items():
        assert tuple(sd[k].shape) == shape, k
    assert len(sd) == 472  # weights, BN statistics and fc of the FID Inception
    assert sum(v.numel() for k, v in sd.items() if "running" not in k) == 23_850_960
    assert not any(k.startswith("AuxLogits") for k in sd)


def test_loads_and_extracts_2048_features(weights):
    path, sd = weights
    net = inc.load_inception(path)
    assert net.weights_name == path.name
    torch.testing.assert_close(net.state_dict()["Mixed_6b.branch1x1.conv.weight"], sd["Mixed_6b.branch1x1.conv.weight"])
    x = torch.rand(2, 1, 8, 8) * 2 - 1  # 1-channel, tiny: repeated to RGB and resized to 299
    assert inc.FIDInception.prepare(x).shape == (2, 3, 299, 299)
    f = net.extract(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float64 and torch.isfinite(f).all()


def test_safetensors_file_with_num_batches_tracked_is_accepted(weights, tmp_path):
    from safetensors.torch import save_file

    _, sd = weights
    st = tmp_path / "inception.safetensors"
    with_nbt = dict(sd, **{"Conv2d_1a_3x3.bn.num_batches_tracked": torch.tensor(0)})
    save_file({k: v.contiguous() for k, v in with_nbt.items()}, str(st))
    assert isinstance(inc.load_inception(st), inc.FIDInception)


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def test_inception_fid_of_a_set_with_itself_is_zero(weights, monkeypatch):
    path, _ = weights
    monkeypatch.setattr(inc.FIDInception, "INPUT_SIZE", 75)  # the smallest input Inception takes: a fast test
    real = _images()
    r = inc.inception_metrics(real, None, path, reference=real)
    assert r["fid_inception"] == pytest.approx(0.0, abs=1e-6)  # one 2048-D Fréchet distance (~5 s on one core)
    assert r["n_inception"] == 6 and r["inception_weights"] == path.name
    assert r["precision_inception"] == 1.0 and r["recall_inception"] == 1.0


@pytest.mark.slow
def test_inception_fid_grows_with_a_shift(weights, monkeypatch):
    path, _ = weights
    monkeypatch.setattr(inc.FIDInception, "INPUT_SIZE", 75)
    real = _images()
    fids = [inc.inception_metrics((real + s).clamp(-1, 1), None, path, reference=real)["fid_inception"]
            for s in (0.3, 0.9)]
    assert 1e-6 < fids[0] < fids[1]


@pytest.mark.slow
def test_fewstep_eval_adds_inception_fid_from_the_environment_variable(weights, tmp_path, monkeypatch, capsys):
    import json

    from fewstep.cli import main

    path, _ = weights
    monkeypatch.setattr(inc.FIDInception, "INPUT_SIZE", 75)
    net = json.dumps({"name": "mlp", "dim": 64, "width": 32, "depth": 1, "emb_channels": 16})
    run = tmp_path / "digits"
    assert main(["teacher", "--data", "digits", "--out", str(run), "--net", net, "--total-kimg", "0.2",
                 "--batch-size", "50", "--no-progress", "--snapshot-every-kimg", "100",
                 "--checkpoint-every-kimg", "100"]) == 0
    monkeypatch.setenv("FEWSTEP_INCEPTION", str(path))
    capsys.readouterr()
    assert main(["eval", str(run), "--n", "8", "--steps", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fid_inception"] > 0 and r["n_inception"] == 8 and r["inception_weights"] == path.name
    assert "fd_digits-featnet" in r  # beside, not instead of, the feature-net FD


def test_missing_file_is_a_clear_error_and_nothing_is_downloaded(tmp_path, monkeypatch):
    import urllib.request

    def no_network(*a, **k):  # pragma: no cover - would mean a download attempt
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FewstepError, match="--inception.*FEWSTEP_INCEPTION"):
        inc.load_inception(tmp_path / "nope.pth")
    monkeypatch.setenv("FEWSTEP_INCEPTION", str(tmp_path / "missing.pth"))
    with pytest.raises(FewstepError, match=r"\$FEWSTEP_INCEPTION"):
        inc.resolve_weights_path(None)
    monkeypatch.delenv("FEWSTEP_INCEPTION")
    assert inc.resolve_weights_path(None) is None
    with pytest.raises(FewstepError, match="never downloads"):
        inc.resolve_weights_path(None, required=True)


def test_wrong_files_are_clear_errors(tmp_path):
    bad = tmp_path / "aux.pth"
    torch.save({"AuxLogits.fc.weight": torch.zeros(1000, 768), "fc.weight": torch.zeros(1000, 2048)}, bad)
    with pytest.raises(FewstepError, match="ImageNet Inception"):
        inc.load_inception(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(FewstepError, match="layout"):
        inc.load_inception(wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FewstepError, match="cannot read"):
        inc.load_inception(junk)


def test_cli_eval_names_the_flag_when_the_file_is_missing(tmp_path, capsys):
    from fewstep.cli import main

    code = main(["eval", "mixture:ring8", "--n", "50", "--inception", str(tmp_path / "none.pth")])
    err = capsys.readouterr().err
    assert code == 2 and "--inception" in err and "Traceback" not in err


def test_own_images_without_a_feature_net_are_measured_by_inception_alone(weights, tmp_path, monkeypatch, capsys):
    """`fewstep eval --data FILE --inception W`: data fewstep has no feature net for (a user's own
    images) gets Inception FID instead of an error; without --inception the error names the flag."""
    import json

    import numpy as np

    from fewstep.cli import main
    from fewstep.data import load_dataset

    path, _ = weights
    monkeypatch.setattr(inc.FIDInception, "INPUT_SIZE", 75)
    monkeypatch.delenv("FEWSTEP_INCEPTION", raising=False)
    mine = tmp_path / "mine.npz"
    np.savez(mine, x=load_dataset("digits", split="all").x.numpy())
    common = ["eval", "shipped:digits", "--data", str(mine), "--n", "8", "--sampler", "euler", "--steps", "2"]
    capsys.readouterr()
    assert main(common) == 2
    assert "--inception" in capsys.readouterr().err
    assert main(common + ["--inception", str(path)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fid_inception"] > 0 and r["n_inception"] == 8 and r["feature_net"] is None
    assert not any(k.startswith("fd_") for k in r)
