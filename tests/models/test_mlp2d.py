"""The toy MLP denoiser: official fixture outputs (fp32, fp64, flat call), init, features."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gmflow.errors import CheckpointError
from gmflow.models.mlp2d import (
    GMMLP2D,
    SigmaDenoiser,
    load_official_toy_mlp,
    official_key_map,
    position_features,
    timestep_features,
)

FIXTURE = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "official_toy_mlp"


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    if not (FIXTURE / "reference_io.npz").is_file():
        pytest.skip(f"official toy fixture not found at {FIXTURE} (needs ../shared/fixtures)")
    return dict(np.load(FIXTURE / "reference_io.npz"))


def _ref(reference, key):
    return torch.from_numpy(reference[key])


@pytest.mark.parametrize(
    ("dtype", "suffix", "tol"),
    [(torch.float32, "fp32", 1e-5), (torch.float64, "fp64", 1e-11)],
)
def test_official_checkpoint_reproduces_the_reference_outputs(reference, dtype, suffix, tol):
    model = load_official_toy_mlp(FIXTURE, dtype=dtype)
    x_t = _ref(reference, "x_t").to(dtype)
    sigma = _ref(reference, "timesteps").to(dtype) / 1000
    with torch.no_grad():
        gm = model(x_t, sigma)  # the σ-based denoiser call
    for name in ("means", "logweights", "logstds"):
        got = getattr(gm, name)
        assert got.dtype == dtype
        torch.testing.assert_close(got, _ref(reference, f"{name}_{suffix}"), rtol=tol, atol=tol)


def test_flat_call_matches_the_reference(reference):
    model = load_official_toy_mlp(FIXTURE)
    x = _ref(reference, "x_t").reshape(-1, 2)  # (N, 2), the trainer's call
    with torch.no_grad():
        gm = model.net(x, _ref(reference, "timesteps"))
    assert gm.means.shape == (64, 8, 2, 1, 1)  # always the GM layout
    torch.testing.assert_close(
        gm.means[..., 0, 0], _ref(reference, "means_fp32_flat_call"), rtol=1e-5, atol=1e-5
    )


def test_official_init_reproduces_the_seed0_reference(reference):
    torch.manual_seed(0)
    net = GMMLP2D(num_gaussians=8)  # same RNG draws as the reference
    with torch.no_grad():
        gm = net(_ref(reference, "x_t"), _ref(reference, "timesteps"))
    for name in ("means", "logweights", "logstds"):
        torch.testing.assert_close(
            getattr(gm, name),
            _ref(reference, f"{name}_fp32_official_init_seed0"),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("k", [1, 8, 64])
def test_init_gives_uniform_weights_and_unit_std(k):
    # spec oracle 9: logits exactly uniform (logsumexp = 0) and log-std exactly 0 at init
    net = GMMLP2D(num_gaussians=k).double()
    x = 3 * torch.randn(50, 2, 1, 1, dtype=torch.float64)
    gm = net(x, 1000 * torch.rand(50, dtype=torch.float64))
    torch.testing.assert_close(
        gm.logweights, torch.full_like(gm.logweights, -math.log(k)), rtol=0, atol=0
    )
    torch.testing.assert_close(
        gm.logweights.logsumexp(dim=1), torch.zeros(50, 1, 1, 1, dtype=torch.float64)
    )
    assert (gm.logstds == 0).all()


def test_init_is_kaiming_normal_with_zero_biases():
    net = GMMLP2D(num_gaussians=64)
    for layer in [*net.trunk, net.head_means]:
        fan_in = layer.weight.shape[1]
        w = layer.weight.detach().double().flatten()
        n = w.numel()
        target = 2.0 / fan_in  # ReLU gain², fan-in
        assert abs(w.mean().item()) < 5 * math.sqrt(target / n)
        assert abs(w.var().item() - target) < 5 * target * math.sqrt(2 / n)
        assert (layer.bias == 0).all()


@pytest.mark.parametrize(("k", "count"), [(64, 1_412_289), (8, 1_326_105)])
def test_parameter_count(k, count):
    assert sum(p.numel() for p in GMMLP2D(num_gaussians=k).parameters()) == count


def test_timestep_features_match_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 0.1, 1.0, 37.5, 500.0, 999.0, 1000.0])
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    torch.testing.assert_close(timestep_features(t, 256), ref, rtol=0, atol=0)
    # fp32 even for fp64 input (the reference's behaviour)
    assert timestep_features(t.double(), 256).dtype == torch.float32


def test_position_features_are_the_fourier_features_of_each_coordinate():
    x = torch.tensor([[0.3, -1.7], [2.0, 0.01]], dtype=torch.float64)
    periods = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    feats = position_features(x, periods)
    for b in range(2):
        expected = []
        for c in range(2):
            arg = [2 * math.pi * x[b, c].item() / p for p in periods.tolist()]
            expected += [math.sin(a) for a in arg] + [math.cos(a) for a in arg]
        torch.testing.assert_close(feats[b], torch.tensor(expected, dtype=torch.float64))


def test_shared_timestep_equals_per_sample_timesteps():
    net = GMMLP2D(num_gaussians=4, hidden_dim=32, num_layers=2).double()
    x = torch.randn(6, 2, 1, 1, dtype=torch.float64)
    a = net(x, torch.tensor(250.0, dtype=torch.float64))
    b = net(x, torch.full((6,), 250.0, dtype=torch.float64))
    for name in ("means", "logweights", "logstds"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_sigma_denoiser_sees_timestep_1000_sigma():
    net = GMMLP2D(num_gaussians=4, hidden_dim=32, num_layers=2).double()
    x = torch.randn(5, 2, 1, 1, dtype=torch.float64)
    sigma = torch.rand(5, dtype=torch.float64)
    a, b = SigmaDenoiser(net)(x, sigma), net(x, 1000 * sigma)
    torch.testing.assert_close(a.means, b.means, rtol=0, atol=0)
    torch.testing.assert_close(a.logstds, b.logstds, rtol=0, atol=0)


def test_constant_logstd_has_no_head():
    net = GMMLP2D(num_gaussians=1, hidden_dim=16, num_layers=1, constant_logstd=0.0)
    assert net.head_logstds is None
    gm = net(torch.randn(3, 2), torch.rand(3))
    assert (gm.logstds == 0).all() and gm.logstds.shape == (3, 1, 1, 1, 1)


def test_key_map_covers_every_parameter():
    net = GMMLP2D(num_gaussians=8)
    assert set(official_key_map(5).values()) == set(net.state_dict())


def test_missing_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_official_toy_mlp(tmp_path / "nowhere")


def test_incomplete_weights_name_the_missing_keys(tmp_path, reference):
    from safetensors.torch import load_file, save_file

    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    state = load_file(str(FIXTURE / "model.safetensors"))
    del state["out_logstds.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \['out_logstds.weight'\]") as err:
        load_official_toy_mlp(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_unknown_config_key_is_a_checkpoint_error(tmp_path, reference):
    (tmp_path / "config.json").write_text('{"num_gaussians": 8, "depth": 3}')
    shutil.copy(FIXTURE / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unknown keys \\['depth'\\]"):
        load_official_toy_mlp(tmp_path)
