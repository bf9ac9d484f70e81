"""SpectrumMLP (spec 9.1, oracle 36): size, features, normalisation, init, cropping, loading."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from gmflow.errors import CheckpointError
from gmflow.gm import IsoGaussian
from gmflow.models.convert import convert_official_spectrum_state_dict, load_official_spectrum_mlp
from gmflow.models.spectrum import SpectrumMLP, spectrum_features


def _random_gaussian(batch: int, c: int, h: int, w: int, per_pixel_var: bool = True) -> IsoGaussian:
    var_shape = (batch, 1, h, w) if per_pixel_var else (batch, 1, 1, 1)
    return IsoGaussian(
        torch.randn(batch, c, h, w, dtype=torch.float64),
        torch.rand(*var_shape, dtype=torch.float64),
    )


def _randomised(net: SpectrumMLP) -> SpectrumMLP:
    for layer in net.layers:
        torch.nn.init.normal_(layer.weight)
        torch.nn.init.normal_(layer.bias)
    return net.double()


def test_released_size_has_37576_parameters():
    assert sum(p.numel() for p in SpectrumMLP((4, 32, 32), (64, 8)).parameters()) == 37_576


def test_features_are_mean_variance_and_spatial_variance_of_the_mean():
    g = _random_gaussian(3, 4, 5, 6)
    features = spectrum_features(g)
    for b in range(3):
        f1 = g.var[b].flatten().mean()
        per_channel = [g.mean[b, c].flatten().var(unbiased=True) for c in range(4)]
        torch.testing.assert_close(features[b], torch.stack([f1, torch.stack(per_channel).mean()]))


def test_fresh_net_outputs_a_white_spectrum():
    lam = SpectrumMLP((4, 8, 8)).double()(_random_gaussian(2, 4, 8, 8))
    assert torch.equal(lam, torch.zeros(2, 4, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("size", [(8, 8), (5, 6), (1, 3)])
def test_spectrum_is_normalised_per_channel_and_sample(size):
    net = _randomised(SpectrumMLP((3, 8, 8), (16, 4)))
    lam = net(_random_gaussian(4, 3, *size, per_pixel_var=False))
    assert lam.shape == (4, 3, *size)
    mean_power = lam.exp().mean(dim=(-2, -1))
    torch.testing.assert_close(mean_power, torch.ones_like(mean_power))
    assert lam.std() > 0.1  # not trivially white


@pytest.mark.parametrize("size", [(5, 6), (4, 7), (8, 3), (8, 8), (1, 1), (1, 8), (2, 5)])
def test_cropping_keeps_the_low_frequency_corner_blocks(size):
    # each small-grid frequency (signed, FFT ordering) must read the base grid at that frequency
    base_h, base_w = 8, 8
    net = _randomised(SpectrumMLP((2, base_h, base_w), (16, 4)))
    g = _random_gaussian(1, 2, *size)
    lam = net(g)
    x = spectrum_features(g).reshape(1, 2)
    for layer in net.layers[:-1]:
        x = torch.nn.functional.silu(layer(x))
    raw = net.layers[-1](x).reshape(2, base_h, base_w)
    h, w = size

    def signed(i: int, n: int) -> int:
        return i if i < (n + 1) // 2 else i - n

    picked = torch.stack(
        [
            torch.stack(
                [raw[:, signed(r, h) % base_h, signed(c, w) % base_w] for c in range(w)], -1
            )
            for r in range(h)
        ],
        -2,
    )
    expected = picked.flatten(-2).log_softmax(-1).reshape(2, h, w) + math.log(h * w)
    torch.testing.assert_close(lam[0], expected)


def test_wrong_channel_count_or_larger_size_is_rejected():
    net = SpectrumMLP((4, 8, 8))
    with pytest.raises(ValueError, match="C=4"):
        net(_random_gaussian(1, 3, 8, 8).to(torch.float32))
    with pytest.raises(ValueError, match="crop"):
        net(_random_gaussian(1, 4, 16, 8).to(torch.float32))


def test_official_spectrum_net_loads_through_the_key_map(tmp_path):
    reference = _randomised(SpectrumMLP((4, 8, 8), (64, 8))).float()
    official = {
        f"mlp.{2 * j}.{p}": getattr(layer, p).detach().clone()
        for j, layer in enumerate(reference.layers)
        for p in ("weight", "bias")
    }
    save_file(official, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(
        json.dumps({"_class_name": "_SpectrumMLP", "base_size": [4, 8, 8], "layers": [64, 8]})
    )
    loaded = load_official_spectrum_mlp(tmp_path)
    g = _random_gaussian(2, 4, 8, 8).to(torch.float32)
    torch.testing.assert_close(loaded(g), reference(g))
    with pytest.raises(CheckpointError, match="mlp.1.weight"):
        convert_official_spectrum_state_dict({"mlp.1.weight": torch.zeros(1)})
