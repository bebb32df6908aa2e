"""fewstep.nets: shapes, conditioning, zero-init output, config round-trips, gradients, errors."""
from __future__ import annotations

import json

import pytest
import torch

from fewstep.config import from_dict, to_dict
from fewstep.diffusion.denoiser import EDMPrecond, edm_scalings
from fewstep.errors import FewstepError
from fewstep.nets import (MLP, MLPConfig, UNet, UNetConfig, build_net, count_params, net_config,
                          preset_net)

SMALL_UNET = dict(name="unet", img_resolution=28, model_channels=16, channel_mult=[1, 2], num_blocks=1)


def _inputs(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randn(n, generator=g) * 0.5


def _perturb(net: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter random values (the zero-initialised output would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("dataset,shape", [("mnist5k", (1, 28, 28)), ("digits", (1, 8, 8)),
                                           ("moons", (2,)), ("8gaussians", (2,))])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_presets_shapes(dataset, shape, num_classes):
    cfg = preset_net(dataset, num_classes=num_classes)
    net = build_net(cfg, seed=0)
    assert net.num_classes == num_classes and count_params(net) < 3_000_000
    x, c = _inputs(shape)
    labels = torch.tensor([0, 3, num_classes]) if num_classes else None
    with torch.no_grad():
        assert net(x, c, labels).shape == x.shape


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_preset_sizes(size):
    sizes = []
    for dataset, shape in [("mnist5k", (1, 28, 28)), ("digits", (1, 8, 8)), ("swissroll", (2,))]:
        net = build_net(preset_net(dataset, size=size))
        x, c = _inputs(shape, n=2)
        with torch.no_grad():
            assert net(x, c).shape == x.shape
        sizes.append(count_params(net))
    if size == "small":
        assert 500_000 < sizes[0] < 2_000_000                           # the CPU teacher for MNIST
    with pytest.raises(FewstepError, match="size"):
        preset_net("mnist5k", size="huge")


def test_points_16d_preset():
    from fewstep.data import Affine, Dataset
    ds = Dataset("p16", torch.randn(10, 16), None, 0, "points", Affine.identity(16))
    net = build_net(preset_net(ds))
    x, c = _inputs((16,))
    assert isinstance(net, MLP) and net(x, c).shape == (3, 16)


@pytest.mark.parametrize("unshuffle,mult,attn", [(1, [1, 2, 2], [7]), (2, [1, 2, 2], [7, 4]), (2, [1, 2], [])])
def test_unet_28x28_with_and_without_unshuffle(unshuffle, mult, attn):
    net = UNet(img_resolution=28, model_channels=16, channel_mult=mult, num_blocks=1, pixel_unshuffle=unshuffle,
               attn_resolutions=attn)
    _perturb(net)
    x, c = _inputs((1, 28, 28), n=2)
    with torch.no_grad():
        assert net(x, c).shape == (2, 1, 28, 28)


def test_unet_odd_sizes_and_rgb():
    net = UNet(img_resolution=14, in_channels=3, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1)
    assert net.config.resolutions == [14, 7, 4]
    x, c = _inputs((3, 14, 14), n=2)
    with torch.no_grad():
        assert net(x, c).shape == x.shape
        assert net(torch.randn(2, 3, 10, 6), c).shape == (2, 3, 10, 6)  # non-square works too


def test_fresh_denoiser_is_c_skip_x():
    for cfg, shape in [(preset_net("mnist5k"), (1, 28, 28)), (preset_net("moons"), (2,))]:
        net = build_net(cfg, seed=0)
        x, _ = _inputs(shape)
        sigma = torch.tensor([0.01, 1.0, 50.0])
        assert torch.count_nonzero(net(x, sigma.log() / 4)) == 0
        c_skip = edm_scalings(sigma)[0].reshape(-1, *[1] * len(shape))
        assert torch.allclose(EDMPrecond(net)(x, sigma), c_skip * x)


@pytest.mark.parametrize("cfg,shape", [(dict(SMALL_UNET, num_classes=4), (1, 28, 28)),
                                       (dict(name="mlp", dim=2, width=32, depth=2, num_classes=4), (2,))])
def test_class_conditioning(cfg, shape):
    net = build_net(cfg, seed=0).eval()
    _perturb(net)
    x, c = _inputs(shape, n=2)
    x, c = x[:1].expand(2, *shape), c[:1].expand(2)
    with torch.no_grad():
        out = net(x, c, torch.tensor([0, 1]))
        assert not torch.allclose(out[0], out[1])                        # the label matters
        null = net(x, c, torch.tensor([4, 4]))                           # K = "no label"
        assert torch.allclose(net(x, c, None), null)                     # None means the null label
        assert not torch.allclose(null[0], out[0])
    with pytest.raises(FewstepError, match="0..4"):
        net(x, c, torch.tensor([0, 5]))
    with pytest.raises(FewstepError, match="shape"):
        net(x, c, torch.tensor([0, 1, 2]))


def test_unconditional_net_ignores_labels():
    net = build_net(dict(name="mlp", dim=2, width=16, depth=1), seed=0)
    _perturb(net)
    x, c = _inputs((2,))
    assert torch.equal(net(x, c, torch.tensor([0, 1, 2])), net(x, c))


@pytest.mark.parametrize("cfg,shape", [
    (dict(SMALL_UNET, num_classes=3, attn_resolutions=[14], pixel_unshuffle=2, embedding="fourier",
          adaptive_scale=False, dropout=0.1), (1, 28, 28)),
    (dict(name="unet", img_resolution=8, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1), (1, 8, 8)),
    (dict(name="mlp", dim=16, width=64, depth=2, embedding="fourier", norm="group", num_classes=2), (16,)),
])
def test_config_json_roundtrip_rebuilds_identical_net(cfg, shape):
    net = build_net(cfg, seed=1).eval()
    _perturb(net)
    text = json.dumps(net_config(net))
    clone = build_net(json.loads(text), seed=2).eval()
    assert net_config(clone) == net_config(net)
    clone.load_state_dict(net.state_dict())
    x, c = _inputs(shape)
    labels = torch.tensor([0, 1, 1]) if net.num_classes else None
    with torch.no_grad():
        assert torch.equal(net(x, c, labels), clone(x, c, labels))
    assert net_config(EDMPrecond(net)) == net_config(net)
    assert from_dict(type(net.config), json.loads(text)) == net.config
    assert to_dict(net.config) == json.loads(text)


def test_seeded_build_is_reproducible_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a = build_net(preset_net("digits"), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_net(preset_net("digits"), seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("cfg,shape", [(dict(SMALL_UNET, num_classes=2, attn_resolutions=[14]), (1, 28, 28)),
                                       (dict(name="mlp", dim=2, width=32, depth=2, num_classes=2), (2,))])
def test_gradients_reach_every_parameter(cfg, shape):
    net = build_net(cfg, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, c = _inputs(shape, n=6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])                            # includes the null label
    # zero-initialised layers (output conv, each block's second conv, attention projections) open
    # the path step by step: step 1 moves the output layer, step 2 the blocks' last convs, step 3 the rest
    for _ in range(3):
        opt.zero_grad()
        loss = (net(x, c, labels) - x).square().mean()
        loss.backward()
        opt.step()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("cfg,match", [
    (dict(name="resnet"), "valid names"),
    (dict(name="unet", channel_mult=[]), "channel_mult"),
    (dict(name="unet", img_resolution=28, pixel_unshuffle=3), "pixel_unshuffle"),
    (dict(name="unet", img_resolution=8, channel_mult=[1, 1, 1, 1, 1]), "shorter channel_mult"),
    (dict(name="unet", img_resolution=28, attn_resolutions=[16]), "levels of this net"),
    (dict(name="unet", dropout=1.5), "dropout"),
    (dict(name="unet", embedding="sinc"), "embedding"),
    (dict(name="unet", model_channels=0), "model_channels"),
    (dict(name="unet", widht=3), "unknown key"),
    (dict(name="mlp", dim=0), "dim"),
    (dict(name="mlp", norm="batch"), "norm"),
    (dict(name="mlp", num_classes=-1), "num_classes"),
    (dict(name="mlp", width="wide"), "width"),
])
def test_bad_configs(cfg, match):
    with pytest.raises(FewstepError, match=match):
        build_net(cfg)


def test_bad_inputs_and_preset_errors():
    net = build_net(dict(SMALL_UNET, pixel_unshuffle=2))
    with pytest.raises(FewstepError, match="images"):
        net(torch.randn(2, 3, 28, 28), torch.zeros(2))
    with pytest.raises(FewstepError, match="divisible"):
        net(torch.randn(2, 1, 27, 27), torch.zeros(2))
    with pytest.raises(FewstepError, match="values per sample"):
        MLP(MLPConfig(dim=2))(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(FewstepError, match="unknown"):
        preset_net("mnist5k", channel=3)
    with pytest.raises(FewstepError, match="not a fewstep backbone"):
        net_config(torch.nn.Linear(2, 2))
    assert UNet(UNetConfig(img_resolution=8, channel_mult=[1])).config.resolutions == [8]


def test_attention_heads_divide_the_channels_whatever_channels_per_head():
    cfg = {"name": "unet", "img_resolution": 8, "in_channels": 1, "model_channels": 50, "channel_mult": [1, 4],
           "num_blocks": 1, "attn_resolutions": [4], "channels_per_head": 64}
    net = build_net(cfg, seed=0)
    heads = [m.heads for m in net.modules() if hasattr(m, "heads")]
    assert heads and all(200 % h == 0 for h in heads)  # 200 channels: 3 heads would not divide them
    assert net(torch.randn(2, 1, 8, 8), torch.ones(2)).shape == (2, 1, 8, 8)


def test_an_all_zero_one_hot_row_is_the_null_class():
    from fewstep.nets import resolve_labels

    onehot = torch.zeros(3, 10)
    onehot[0, 4] = 1.0
    assert resolve_labels(onehot, 10, 3, "cpu").tolist() == [4, 10, 10]
