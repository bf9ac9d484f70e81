"""GM-DiT: official-fixture equivalence, the key map, parameter counts, head layout and init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gmflow.errors import CheckpointError
from gmflow.models.convert import (
    convert_official_gmdit_state_dict,
    load_official_gmdit,
    official_gmdit_config_to_kwargs,
)
from gmflow.models.gm_head import unpatchify
from gmflow.models.gmdit import GMDiT, build_gmdit

TINY = "official_gmdit_tiny"


@pytest.fixture
def tiny_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / TINY


@pytest.fixture
def reference(tiny_dir: Path) -> dict[str, np.ndarray]:
    with np.load(tiny_dir / "reference_io.npz") as data:
        return dict(data)


def _tiny_model(**overrides) -> GMDiT:  # type: ignore[no-untyped-def]
    kwargs = dict(
        in_channels=4,
        sample_size=8,
        patch_size=2,
        hidden_dim=32,
        depth=2,
        num_heads=2,
        num_gaussians=3,
        num_classes=10,
        logstd_inner_dim=16,
    )
    return GMDiT(**{**kwargs, **overrides})


def _run_official_inputs(model: GMDiT, ref: dict[str, np.ndarray], dtype: torch.dtype, labels):  # type: ignore[no-untyped-def]
    tokens = {}

    def keep(module, inputs, output) -> None:  # type: ignore[no-untyped-def]
        tokens["out"] = output

    hook = model.head.proj.register_forward_hook(keep)
    x_t = torch.from_numpy(ref["x_t"]).to(dtype)
    timesteps = torch.from_numpy(ref["timesteps"]).to(dtype)
    with torch.no_grad():
        cond = model.embed_condition(timesteps, labels)
        gm = model.forward_timestep(x_t, timesteps, labels)
    hook.remove()
    return gm, cond, tokens["out"]


@pytest.mark.parametrize(
    ("dtype", "suffix", "tol"), [(torch.float32, "fp32", 1e-5), (torch.float64, "fp64", 1e-10)]
)
def test_official_tiny_checkpoint_reproduces_reference_outputs(
    tiny_dir, reference, dtype, suffix, tol
):
    model = load_official_gmdit(tiny_dir, dtype=dtype)
    labels = torch.from_numpy(reference["class_labels"])
    gm, cond, tokens = _run_official_inputs(model, reference, dtype, labels)
    close = dict(rtol=0, atol=tol)
    torch.testing.assert_close(cond, torch.from_numpy(reference[f"cond_emb_{suffix}"]), **close)
    torch.testing.assert_close(
        tokens, torch.from_numpy(reference[f"proj_out_2_tokens_{suffix}"]), **close
    )
    for field in ("means", "logweights", "logstds"):
        expected = torch.from_numpy(reference[f"{field}_{suffix}"])
        torch.testing.assert_close(getattr(gm, field), expected, **close)


def test_official_tiny_checkpoint_all_null_labels(tiny_dir, reference):
    model = load_official_gmdit(tiny_dir, dtype=torch.float64)
    gm, _, _ = _run_official_inputs(model, reference, torch.float64, None)  # None = null class
    for field in ("means", "logweights", "logstds"):
        expected = torch.from_numpy(reference[f"{field}_fp64_all_null"])
        torch.testing.assert_close(getattr(gm, field), expected, rtol=0, atol=1e-10)


def test_sigma_interface_equals_official_timestep_scale(tiny_dir, reference):
    model = load_official_gmdit(tiny_dir, dtype=torch.float64)
    x_t = torch.from_numpy(reference["x_t"]).double()
    timesteps = torch.from_numpy(reference["timesteps"]).double()
    labels = torch.from_numpy(reference["class_labels"])
    with torch.no_grad():
        gm = model(x_t, timesteps / 1000, labels)
    torch.testing.assert_close(
        gm.means, torch.from_numpy(reference["means_fp64"]), rtol=0, atol=1e-10
    )


def test_bf16_weights_give_fp32_outputs_with_fp32_log_softmax(tiny_dir, reference):
    model = load_official_gmdit(tiny_dir, dtype=torch.bfloat16)
    labels = torch.from_numpy(reference["class_labels"])
    gm, _, _ = _run_official_inputs(model, reference, torch.float32, labels)
    assert {gm.means.dtype, gm.logweights.dtype, gm.logstds.dtype} == {torch.float32}
    # a bf16 log-softmax would leave errors ~1e-2 in the normalisation
    lse = torch.logsumexp(gm.logweights, dim=1)
    torch.testing.assert_close(lse, torch.zeros_like(lse), rtol=0, atol=1e-6)
    # bf16 weights: agreement with the fp32 reference only to bf16 precision
    torch.testing.assert_close(
        gm.means, torch.from_numpy(reference["means_fp32"]), rtol=0, atol=0.15
    )


def test_official_bf16_variant_file_is_found(tiny_dir, tmp_path):
    state = {
        k: v.to(torch.bfloat16)
        for k, v in load_file(tiny_dir / "diffusion_pytorch_model.safetensors").items()
    }
    save_file(state, tmp_path / "diffusion_pytorch_model.bf16.safetensors")
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    model = load_official_gmdit(tmp_path, variant="bf16")  # explicit
    default = load_official_gmdit(tmp_path)  # the only file
    assert model.dtype == default.dtype == torch.float32
    torch.testing.assert_close(model.head.proj.weight, state["proj_out_2.weight"].float())


def test_converter_errors_name_the_folder_and_keys(tiny_dir, tmp_path):
    state = load_file(tiny_dir / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    save_file(
        {**state, "extra.weight": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model.safetensors"
    )
    with pytest.raises(CheckpointError, match="extra.weight"):
        load_official_gmdit(tmp_path)
    del state["proj_out_1.bias"]
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"final_modulation\.bias") as err:
        load_official_gmdit(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(CheckpointError, match="config.json"):
        load_official_gmdit(tmp_path / "nowhere")


def test_official_config_maps_to_constructor(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    kwargs = official_gmdit_config_to_kwargs(config)
    assert kwargs["hidden_dim"] == 32 and kwargs["depth"] == 2 and kwargs["num_classes"] == 1000
    assert kwargs["norm_eps"] == config["norm_eps"] == 1e-5  # the LN before the MLP (spec 5.1)
    with pytest.raises(CheckpointError, match="activation_fn"):
        official_gmdit_config_to_kwargs({**config, "activation_fn": "geglu"})


def test_xl2_k8_has_the_released_parameter_count_and_output_shapes():
    """Oracle 39, on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = build_gmdit("XL/2", num_gaussians=8)
    assert sum(p.numel() for p in model.parameters()) == 676_164_001
    x = torch.empty(3, 4, 32, 32, device="meta")
    gm = model(x, torch.empty(3, device="meta"), torch.zeros(3, dtype=torch.long, device="meta"))
    assert gm.means.shape == (3, 8, 4, 32, 32)
    assert gm.logweights.shape == (3, 8, 1, 32, 32)
    assert gm.logstds.shape == (3, 1, 1, 1, 1)


def test_converter_covers_every_released_key_with_the_right_shape(fixtures_dir):
    released = json.loads((fixtures_dir / TINY / "keys_and_shapes_k8_xl.json").read_text())
    official = {k: torch.empty(shape, device="meta") for k, shape in released["keys"].items()}
    assert sum(t.numel() for t in official.values()) == released["total_parameters"]
    converted = convert_official_gmdit_state_dict(official)
    cfg = released["config"]
    with torch.device("meta"):
        model = GMDiT(
            **official_gmdit_config_to_kwargs(
                {**cfg, "num_embeds_ada_norm": 1000, "norm_eps": 1e-5, "constant_logstd": None}
            )
        )
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    assert sum(t.numel() for t in converted.values()) == released["total_parameters"]


def test_unpatchify_places_each_token_value_at_its_pixel():
    # oracle 40 with G = K(C+1) = 8·5 = 40 per position, on a 3x2 token grid
    p, g, h, w = 2, 40, 3, 2
    tokens = torch.arange(h * w * p * p * g, dtype=torch.float64).reshape(1, h * w, p * p * g)
    image = unpatchify(tokens, (h, w), p)
    assert image.shape == (1, g, h * p, w * p)
    for row in range(h):
        for col in range(w):
            for pr in range(p):
                for pc in range(p):
                    for ch in (0, 7, 31, 32, 39):
                        index = (pr * p + pc) * g + ch
                        assert (
                            image[0, ch, p * row + pr, p * col + pc]
                            == tokens[0, row * w + col, index]
                        )


def test_head_channel_split_means_component_major_logits_last():
    model = _tiny_model(num_gaussians=2, in_channels=3).double()
    image = {}

    def keep(module, inputs, output) -> None:  # type: ignore[no-untyped-def]
        image["x"] = unpatchify(output, (4, 4), 2)

    model.head.proj.register_forward_hook(keep)
    x_t = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        gm = model(x_t, torch.tensor([0.3, 0.9]), torch.tensor([1, 10]))
    x = image["x"]
    torch.testing.assert_close(gm.means[:, 1, 2], x[:, 1 * 3 + 2])  # g = k·C + c
    torch.testing.assert_close(gm.logweights[:, :, 0], x[:, 6:].log_softmax(dim=1))


def test_fresh_model_has_normalised_weights_and_zero_logstd():
    model = _tiny_model()
    x_t = torch.randn(3, 4, 8, 8)
    gm = model(x_t, torch.tensor([1.0, 0.5, 1e-4]), torch.tensor([0, 5, 10]))
    lse = torch.logsumexp(gm.logweights, dim=1)
    torch.testing.assert_close(lse, torch.zeros_like(lse), rtol=0, atol=1e-6)
    assert torch.equal(gm.logstds, torch.zeros(3, 1, 1, 1, 1))
    # adaLN-Zero: every block is the identity at init, so the output only depends on x_t's tokens
    assert all(
        torch.equal(b.modulation.weight, torch.zeros_like(b.modulation.weight))
        for b in model.blocks
    )


def test_logstd_gradient_does_not_reach_the_embeddings():
    model = _tiny_model()
    torch.nn.init.normal_(model.head.logstd_mlp[-1].weight)
    gm = model(torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.7]), torch.tensor([1, 2]))
    gm.logstds.sum().backward()
    assert model.class_embed.weight.grad is None or not model.class_embed.weight.grad.any()
    assert model.head.logstd_mlp[-1].weight.grad.abs().sum() > 0


def test_pixel_space_single_channel_and_other_sizes():
    model = _tiny_model(in_channels=1, sample_size=16, num_classes=0).double()
    torch.nn.init.normal_(model.final_modulation.weight, std=0.1)
    for size in [(16, 16), (8, 12)]:
        x_t = torch.randn(2, 1, *size, dtype=torch.float64)
        gm = model(x_t, 0.5)  # unconditional
        assert gm.means.shape == (2, 3, 1, *size) and gm.logweights.shape == (2, 3, 1, *size)
        lse = torch.logsumexp(gm.logweights, dim=1)
        torch.testing.assert_close(lse, torch.zeros_like(lse))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 9, 8, dtype=torch.float64), 0.5)


def test_sdpa_and_explicit_attention_agree(tiny_dir, reference):
    model = load_official_gmdit(tiny_dir, dtype=torch.float64)
    labels = torch.from_numpy(reference["class_labels"])
    model.set_attention_backend(use_sdpa=False)
    gm, _, _ = _run_official_inputs(model, reference, torch.float64, labels)
    torch.testing.assert_close(
        gm.means, torch.from_numpy(reference["means_fp64"]), rtol=0, atol=1e-10
    )


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    grads = []
    for use in (False, True):
        model = load_official_gmdit(tiny_dir, dtype=torch.float64).train()
        model.use_checkpointing = use
        gen = torch.Generator().manual_seed(3)
        x_t = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
        gm = model(x_t, torch.tensor([0.3, 0.8]), torch.tensor([1, 1000]))
        (gm.means.square().sum() + gm.logweights.exp().square().sum()).backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
