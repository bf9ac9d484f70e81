"""GMDiTPipeline: official snapshots via the converter, save/load, labels, the call (spec 10)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gmflow.errors import CheckpointError, ConfigError
from gmflow.flow import sample
from gmflow.gm import IsoGaussian
from gmflow.models.convert import convert_official_gmdit_state_dict
from gmflow.pipelines import (
    FlowEulerODEScheduler,
    FlowSDEScheduler,
    GMDiTPipeline,
    GMDiTTransformer2DModel,
    SpectrumMLPModel,
    imagenet_id2label,
)

TINY = "official_gmdit_tiny"
# The three spellings of the released model_index.json (original repository, LakonLab as its
# documentation rewrites it, and LakonLab's package-level names).
OFFICIAL_INDEXES = {
    "orig": {
        "transformer": ["lib.models.architecture.gmflow", "_GMDiTTransformer2DModel"],
        "spectrum_net": ["lib.models.architecture.gmflow", "_SpectrumMLP"],
        "scheduler": ["lib.models.diffusions.schedulers.flow_euler_ode", "FlowEulerODEScheduler"],
    },
    "lakonlab": {
        "transformer": ["lakonlab.models.architecture.gmflow.gmdit", "GMDiTTransformer2DModel"],
        "spectrum_net": ["lakonlab.models.architecture.gmflow.spectrum_mlp", "SpectrumMLP"],
        "scheduler": [
            "lakonlab.models.diffusions.schedulers.flow_euler_ode",
            "FlowEulerODEScheduler",
        ],
    },
}


def _official_spectrum_weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random spectrum net (layers [64, 8], base (4, 8, 8)) in the official mlp.{2j} layout."""
    shapes = {"mlp.0": (64, 2), "mlp.2": (8, 64), "mlp.4": (4 * 8 * 8, 8)}
    out = {}
    for name, (rows, cols) in shapes.items():
        out[f"{name}.weight"] = 0.3 * torch.randn(rows, cols, generator=gen)
        out[f"{name}.bias"] = 0.1 * torch.randn(rows, generator=gen)
    return out


def _write_official_snapshot(root: Path, fixture: Path, spelling: str, bf16: bool = False) -> Path:
    """An official-style pipeline folder around the tiny fixture transformer (no VAE)."""
    gen = torch.Generator().manual_seed(5)
    (root / "transformer").mkdir(parents=True)
    shutil.copy(fixture / "config.json", root / "transformer" / "config.json")
    weights = load_file(fixture / "diffusion_pytorch_model.safetensors")
    if bf16:
        weights = {k: v.to(torch.bfloat16) for k, v in weights.items()}
        save_file(weights, root / "transformer" / "diffusion_pytorch_model.bf16.safetensors")
    else:
        (root / "transformer" / "diffusion_pytorch_model.safetensors").symlink_to(
            fixture / "diffusion_pytorch_model.safetensors"
        )
    (root / "spectrum_net").mkdir()
    (root / "spectrum_net" / "config.json").write_text(
        json.dumps({"_class_name": "_SpectrumMLP", "base_size": [4, 8, 8], "layers": [64, 8]})
    )
    save_file(
        _official_spectrum_weights(gen),
        root / "spectrum_net" / "diffusion_pytorch_model.safetensors",
    )
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            {"_class_name": "FlowEulerODEScheduler", "num_train_timesteps": 1000, "shift": 1.0}
        )
    )
    index = {
        "_class_name": "GMDiTPipeline",
        "_diffusers_version": "0.31.0",
        **OFFICIAL_INDEXES[spelling],
        "vae": [None, None],
        "id2label": {"0": "tench, Tinca tinca", "1": "jay, garrulus", "999": "toilet tissue"},
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture
def trapped_imports(tmp_path, monkeypatch):
    """Packages named like the official libraries that fail loudly if anything imports them."""
    trap = tmp_path / "trap"
    for package in ("lib", "lakonlab"):
        (trap / package).mkdir(parents=True)
        (trap / package / "__init__.py").write_text(
            f"raise ImportError('the loader imported the foreign package {package}')\n"
        )
    monkeypatch.syspath_prepend(str(trap))
    yield
    assert "lib" not in sys.modules and "lakonlab" not in sys.modules


@pytest.mark.parametrize("spelling", sorted(OFFICIAL_INDEXES))
def test_official_snapshot_loads_and_reproduces_fixture(
    spelling, tmp_path, fixtures_dir, trapped_imports
):
    fixture = fixtures_dir / TINY
    folder = _write_official_snapshot(tmp_path / "snap", fixture, spelling)
    pipe = GMDiTPipeline.from_pretrained(folder)
    assert isinstance(pipe.transformer, GMDiTTransformer2DModel)
    assert isinstance(pipe.scheduler, FlowEulerODEScheduler) and pipe.vae is None
    with np.load(fixture / "reference_io.npz") as ref:
        inputs = (torch.from_numpy(ref["x_t"]), torch.from_numpy(ref["timesteps"]))
        labels = torch.from_numpy(ref["class_labels"])
        with torch.no_grad():
            gm32 = pipe.transformer.forward_timestep(*inputs, labels)
            gm64 = pipe.transformer.double().forward_timestep(
                inputs[0].double(), inputs[1].double(), labels
            )
        for field in ("means", "logweights", "logstds"):
            expected64 = torch.from_numpy(ref[f"{field}_fp64"])
            torch.testing.assert_close(getattr(gm64, field), expected64, rtol=0, atol=1e-10)
            expected32 = torch.from_numpy(ref[f"{field}_fp32"])
            torch.testing.assert_close(getattr(gm32, field), expected32, rtol=0, atol=1e-5)
    # the spectrum net through the mlp.{2j} -> layers.{j} map, against a by-hand forward
    official = load_file(folder / "spectrum_net" / "diffusion_pytorch_model.safetensors")
    g = IsoGaussian(torch.randn(3, 4, 8, 8), torch.rand(3, 1, 8, 8) + 0.1)
    f = torch.stack([g.var.mean(dim=(1, 2, 3)), g.mean.flatten(2).var(dim=-1).mean(-1)], dim=-1)
    h = F.silu(f @ official["mlp.0.weight"].T + official["mlp.0.bias"])
    h = F.silu(h @ official["mlp.2.weight"].T + official["mlp.2.bias"])
    raw = (h @ official["mlp.4.weight"].T + official["mlp.4.bias"]).reshape(3, 4, 64)
    expected = (raw.log_softmax(-1) + math.log(64)).reshape(3, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pipe.spectrum_net(g), expected, rtol=1e-5, atol=1e-5)
    # model_index.json's id2label overrides the bundled ImageNet names
    assert pipe.get_label_ids(["jay", "garrulus"]) == [1, 1]
    with pytest.raises(ConfigError, match="unknown class name 'magpie'"):
        pipe.get_label_ids(["magpie"])


def test_official_bf16_only_snapshot_picks_the_variant(tmp_path, fixtures_dir):
    fixture = fixtures_dir / TINY
    folder = _write_official_snapshot(tmp_path / "snap", fixture, "orig", bf16=True)
    pipe = GMDiTPipeline.from_pretrained(folder)  # no variant given: the only one present
    weights = load_file(fixture / "diffusion_pytorch_model.safetensors")
    expected = convert_official_gmdit_state_dict({k: v.bfloat16() for k, v in weights.items()})
    loaded = pipe.transformer.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value.float()), key


def _tiny_transformer(in_channels: int = 3, num_classes: int = 1000) -> GMDiTTransformer2DModel:
    return GMDiTTransformer2DModel(
        num_gaussians=2,
        logstd_inner_dim=8,
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        num_layers=1,
        sample_size=8,
        num_embeds_ada_norm=num_classes,
    )


def _tiny_vae():  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def _tiny_pipeline(vae: bool = False, scheduler=None, id2label=None) -> GMDiTPipeline:  # type: ignore[no-untyped-def]
    pipe = GMDiTPipeline(
        transformer=_tiny_transformer(in_channels=4 if vae else 3, num_classes=10),
        scheduler=scheduler or FlowEulerODEScheduler(),
        spectrum_net=SpectrumMLPModel(base_size=(4 if vae else 3, 8, 8), layers=(8,)),
        vae=_tiny_vae() if vae else None,
        id2label=id2label,
    )
    # random (nonzero) heads so that outputs depend on every weight
    for p in pipe.transformer.parameters():
        p.data.normal_(0, 0.05)
    for p in pipe.spectrum_net.parameters():
        p.data.normal_(0, 0.3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_save_load_round_trip_with_vae_and_bf16_variant(tmp_path):
    pipe = _tiny_pipeline(vae=True, scheduler=FlowSDEScheduler(shift=2.0), id2label={3: "jay, x"})
    pipe.save_pretrained(tmp_path / "fp32")
    index = json.loads((tmp_path / "fp32" / "model_index.json").read_text())
    assert index["transformer"] == ["gmflow.pipelines.models", "GMDiTTransformer2DModel"]
    loaded = GMDiTPipeline.from_pretrained(tmp_path / "fp32")
    for name in ("transformer", "spectrum_net", "vae"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert isinstance(loaded.scheduler, FlowSDEScheduler) and loaded.scheduler.config.shift == 2.0
    assert loaded.get_label_ids("x") == [3]
    call = dict(num_inference_steps=2, num_inference_substeps=1, output_mode="sample")
    out = pipe([3, 4], generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    again = loaded([3, 4], generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    torch.testing.assert_close(again.images, out.images, rtol=0, atol=0)
    pipe.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", variant="bf16")
    assert (
        tmp_path / "bf16" / "transformer" / "diffusion_pytorch_model.bf16.safetensors"
    ).is_file()
    loaded = GMDiTPipeline.from_pretrained(
        tmp_path / "bf16", variant="bf16", torch_dtype=torch.bfloat16
    )
    assert loaded.transformer.dtype == torch.bfloat16
    ours, theirs = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_call_is_flow_sample_then_vae_decode():
    """GM-ODE 2: the pipeline's latents are gmflow.flow.sample's; images are their decoding."""
    pipe = _tiny_pipeline(vae=True)
    kwargs = dict(guidance_scale=0.3, num_inference_steps=3, num_inference_substeps=2)
    latents = pipe(
        [1, 7], generator=torch.Generator().manual_seed(4), output_type="latent", **kwargs
    )
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    expected = sample(
        pipe.transformer,
        noise,
        solver="gm-ode",
        num_steps=3,
        num_substeps=2,
        order=2,
        guidance_scale=0.3,
        null_class_id=10,
        class_labels=torch.tensor([1, 7]),
    )
    torch.testing.assert_close(latents.images, expected, rtol=0, atol=0)
    refined = pipe(  # the official call's gm2_correction_steps reaches flow.sample
        [1, 7], generator=torch.Generator().manual_seed(4), output_type="latent",
        gm2_correction_steps=2, **kwargs,
    )  # fmt: skip
    expected_refined = sample(
        pipe.transformer, noise, solver="gm-ode", num_steps=3, num_substeps=2, order=2,
        guidance_scale=0.3, null_class_id=10, class_labels=torch.tensor([1, 7]),
        gm2_correction_steps=2,
    )  # fmt: skip
    torch.testing.assert_close(refined.images, expected_refined, rtol=0, atol=0)
    images = pipe([1, 7], generator=torch.Generator().manual_seed(4), output_type="pt", **kwargs)
    with torch.no_grad():
        decoded = pipe.vae.decode(expected / 0.18215).sample
    torch.testing.assert_close(images.images, (decoded / 2 + 0.5).clamp(0, 1))
    array = pipe([1], generator=torch.Generator().manual_seed(4), output_type="np", **kwargs).images
    assert array.shape == (1, 16, 16, 3) and array.min() >= 0 and array.max() <= 1
    pil = pipe([1], output_type="pil", **kwargs).images
    assert len(pil) == 1 and pil[0].size == (16, 16)


def test_guided_steps_are_one_forward_on_cond_then_null():
    pipe = _tiny_pipeline()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, args: calls.append(args))
    pipe([3, 5], guidance_scale=0.4, num_inference_steps=3, num_inference_substeps=2, order=1)
    assert len(calls) == 3  # one network evaluation per step, sub-steps are analytic
    for x_t, sigma, labels in calls:
        assert labels.tolist() == [3, 5, 10, 10]  # [cond; null], null = num_classes
        assert torch.equal(x_t[:2], x_t[2:]) and torch.equal(sigma[:2], sigma[2:])
    calls.clear()
    pipe(np.array([3, 5]), guidance_scale=0.0, num_inference_steps=2, order=1)
    assert [c[2].tolist() for c in calls] == [[3, 5], [3, 5]]


def test_sample_mode_draws_x0_through_the_spectrum_net():
    pipe = _tiny_pipeline(scheduler=FlowSDEScheduler())
    call = dict(num_inference_steps=2, num_inference_substeps=1, output_mode="sample")
    calls = []
    pipe.spectrum_net.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    spectral = pipe([2], generator=torch.Generator().manual_seed(1), output_type="pt", **call)
    assert calls == [torch.Size([1, 3, 8, 8])] * 2  # one spectrum per network step
    pipe.spectrum_net.layers[-1].weight.data.mul_(3.0)  # a different learned spectrum
    other = pipe([2], generator=torch.Generator().manual_seed(1), output_type="pt", **call)
    assert not torch.allclose(spectral.images, other.images)


def test_a_diffusers_scheduler_runs_as_a_flow_matching_baseline_on_the_gm_mean():
    """Spec 17.1: any Diffusers scheduler, here DPM++ 2M SDE, via from_config of the pipeline's."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = _tiny_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, prediction_type="flow_prediction", use_flow_sigmas=True,
        algorithm_type="sde-dpmsolver++", flow_shift=2.0,
    )  # fmt: skip
    call = dict(guidance_scale=0.3, num_inference_steps=3, num_inference_substeps=1, order=1)
    got = pipe([1, 7], generator=torch.Generator().manual_seed(4), output_type="latent", **call)
    gen = torch.Generator().manual_seed(4)  # the pipeline's draws: noise, then the loop seed
    noise = torch.randn(2, 3, 8, 8, generator=gen)
    loop = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    expected = sample(
        pipe.transformer, noise, solver="diffusers", scheduler=pipe.scheduler, num_steps=3,
        guidance_scale=0.3, null_class_id=10, class_labels=torch.tensor([1, 7]), generator=loop,
    )  # fmt: skip
    torch.testing.assert_close(got.images, expected, rtol=0, atol=0)
    other = pipe([1, 7], generator=torch.Generator().manual_seed(5), output_type="latent", **call)
    assert not torch.allclose(other.images, got.images)
    with pytest.raises(ConfigError, match=r"output_mode='mean', num_inference_substeps=1 and "):
        pipe([1], num_inference_steps=2, order=1)  # default S = 4
    with pytest.raises(ConfigError, match=r"order=2 is the GM second-order correction"):
        pipe([1], num_inference_steps=2, num_inference_substeps=1)  # default order 2
    pipe.scheduler = DPMSolverMultistepScheduler()  # epsilon prediction: not a velocity model
    with pytest.raises(ConfigError, match=r"needs prediction_type='flow_prediction'"):
        pipe([1], num_inference_steps=2, num_inference_substeps=1, order=1)


def test_a_pipeline_saved_with_a_diffusers_scheduler_loads_back(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from gmflow.model_loading import scheduler_shift

    pipe = _tiny_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.0
    )
    pipe.save_pretrained(tmp_path / "dpm")
    loaded = GMDiTPipeline.from_pretrained(tmp_path / "dpm")
    assert isinstance(loaded.scheduler, DPMSolverMultistepScheduler)
    assert scheduler_shift(loaded.scheduler) == 2.0 and scheduler_shift(pipe.scheduler) == 2.0
    assert scheduler_shift(FlowSDEScheduler(shift=3.0)) == 3.0
    call = dict(num_inference_steps=3, num_inference_substeps=1, order=1, output_type="latent")
    a = pipe([1, 2], generator=torch.Generator().manual_seed(0), **call).images
    b = loaded([1, 2], generator=torch.Generator().manual_seed(0), **call).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    index_path = tmp_path / "dpm" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", "AutoencoderKL"]  # a diffusers class, but no scheduler
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'AutoencoderKL'\] is not a scheduler of the "):
        GMDiTPipeline.from_pretrained(tmp_path / "dpm")


def test_call_rejects_bad_options():
    pipe = _tiny_pipeline()
    for w in (1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            pipe([1], guidance_scale=w, num_inference_steps=1)
    with pytest.raises(ConfigError, match="FlowSDEScheduler"):
        pipe([1], output_mode="sample", num_inference_substeps=1, num_inference_steps=1)
    pipe.scheduler = FlowSDEScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ConfigError, match="num_inference_substeps=1"):
        pipe([1], output_mode="sample", num_inference_steps=1)  # default S = 4
    with pytest.raises(ConfigError, match="output_mode='mean' with FlowSDEScheduler"):
        pipe([1], num_inference_steps=1)
    with pytest.raises(ConfigError, match=r"class ids in \[0, 10\]"):
        pipe([11], output_mode="sample", num_inference_substeps=1, num_inference_steps=1)
    with pytest.raises(ConfigError, match="output_type"):
        pipe([1], output_mode="sample", num_inference_substeps=1, output_type="jpg")


def test_imagenet_names_and_label_lookup():
    names = imagenet_id2label()
    assert sorted(names) == list(range(1000))
    assert (names[0], names[17], names[18], names[207]) == (
        "tench, Tinca tinca",
        "jay",
        "magpie",
        "golden retriever",
    )
    meta = pytest.importorskip("torchvision.models._meta")  # an independent list of first names
    disambiguated = {134: "crane bird", 639: "maillot tank suit"}  # torchvision's own renames
    for i, name in enumerate(meta._IMAGENET_CATEGORIES):
        if i not in disambiguated:
            assert name.lower() in [s.strip().lower() for s in names[i].split(",")], i
    pipe = GMDiTPipeline(transformer=_tiny_transformer(), scheduler=FlowEulerODEScheduler())
    assert pipe.get_label_ids(["jay", "magpie"]) == [17, 18]
    assert pipe.get_label_ids("great white shark") == [2]  # a bare string is one name
    assert pipe.get_label_ids(["Jay", "Carcharodon carcharias"]) == [17, 2]
    assert pipe.labels["tench"] == 0 and "crane" not in pipe.labels
    with pytest.raises(ConfigError, match="did you mean 'magpie'"):
        pipe.get_label_ids(["magpi"])
    with pytest.raises(ConfigError, match="134.*517"):
        pipe.get_label_ids(["crane"])


def test_from_pretrained_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="neither an existing folder nor a hub id"):
        GMDiTPipeline.from_pretrained(tmp_path / "missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"'gmflow-tests/absent'.*hf download gmflow-tests"):
        GMDiTPipeline.from_pretrained("gmflow-tests/absent", cache_dir=tmp_path / "cache")
    with pytest.raises(CheckpointError, match="no model_index.json"):
        GMDiTPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(
        json.dumps({"transformer": ["somelib.models", "UNet2DModel"], "scheduler": [None, None]})
    )
    with pytest.raises(CheckpointError, match="transformer.*UNet2DModel.*not a component"):
        GMDiTPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(
        json.dumps({"transformer": ["lib.models.architecture.gmflow", "_GMDiTTransformer2DModel"]})
    )
    with pytest.raises(CheckpointError, match="names no scheduler"):
        GMDiTPipeline.from_pretrained(tmp_path, transformer=_tiny_transformer())
    with pytest.raises(CheckpointError, match="transformer does not exist"):
        GMDiTPipeline.from_pretrained(tmp_path, scheduler=FlowEulerODEScheduler())
    with pytest.raises(ConfigError, match="never runs code"):
        GMDiTPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    with pytest.raises(ConfigError, match="unexpected argument"):
        GMDiTPipeline.from_pretrained(tmp_path, unet=None)
