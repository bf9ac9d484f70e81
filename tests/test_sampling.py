"""gmflow.sampling.generate: seeds, batch-size independence, pipeline/run sources, files, errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmflow.config import dump_recipe
from gmflow.errors import CheckpointError, ConfigError
from gmflow.flow import sample
from gmflow.run_config import DataConfig, ModelConfig, RunConfig
from gmflow.sampling import SampleConfig, generate


def _tiny_pipeline(vae: bool):  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL

    from gmflow.pipelines import (
        FlowEulerODEScheduler,
        GMDiTPipeline,
        GMDiTTransformer2DModel,
        SpectrumMLPModel,
    )

    channels = 4 if vae else 3
    transformer = GMDiTTransformer2DModel(
        num_gaussians=2,
        logstd_inner_dim=8,
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=channels,
        num_layers=1,
        sample_size=8,
        num_embeds_ada_norm=1000,
    )
    spectrum = SpectrumMLPModel(base_size=(channels, 8, 8), layers=(8,))
    for p in [*transformer.parameters(), *spectrum.parameters()]:
        p.data.normal_(0, 0.05)
    autoencoder = None
    if vae:
        autoencoder = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
        )
    pipe = GMDiTPipeline(
        transformer=transformer,
        scheduler=FlowEulerODEScheduler(shift=1.5),
        spectrum_net=spectrum,
        vae=autoencoder,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pixel_pipeline")
    _tiny_pipeline(vae=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("latent_pipeline")
    _tiny_pipeline(vae=True).save_pretrained(folder)
    return folder


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def _config(out_dir: Path, **kwargs) -> SampleConfig:  # type: ignore[no-untyped-def]
    base = dict(
        solver="gm-ode2", class_ids=(1, 2, 3), num_steps=2, num_substeps=2, guidance_scale=0.3
    )
    return SampleConfig(out_dir=out_dir, **{**base, **kwargs})


def test_deterministic_solver_is_independent_of_batch_size(pixel_dir, tmp_path):
    results = [
        generate(_config(tmp_path / f"b{b}", pretrained=str(pixel_dir), batch_size=b))
        for b in (1, 2, 3)
    ]
    for i in range(3):
        ref = _png(results[0].image_paths[i])
        for other in results[1:]:
            assert np.abs(_png(other.image_paths[i]) - ref).max() <= 1  # uint8 rounding at most
    # sample i starts from the noise of seed + i: a run seeded at 42 + 2 reproduces sample 2
    alone = generate(
        _config(tmp_path / "alone", pretrained=str(pixel_dir), class_ids=(3,), seed=44)
    )
    assert np.abs(_png(alone.image_paths[0]) - _png(results[0].image_paths[2])).max() <= 1
    assert results[0].seeds == (42, 43, 44) and results[0].class_ids == (1, 2, 3)


@pytest.mark.parametrize("solver", ["gm-sde2", "ddpm", "dpmpp-2m-sde"])
def test_stochastic_solver_is_independent_of_batch_size(pixel_dir, tmp_path, solver):
    results = [
        generate(
            _config(
                tmp_path / f"b{b}",
                pretrained=str(pixel_dir),
                solver=solver,
                num_substeps=None,
                batch_size=b,
            )
        )
        for b in (1, 3)
    ]
    for a, b in zip(results[0].image_paths, results[1].image_paths, strict=True):
        assert np.abs(_png(a) - _png(b)).max() <= 1  # uint8 rounding at most


def test_stochastic_solver_is_reproducible_and_seeded(pixel_dir, tmp_path):
    cfg = _config(
        tmp_path / "a", pretrained=str(pixel_dir), solver="gm-sde2", num_substeps=None, batch_size=2
    )
    first, second = generate(cfg), generate(replace(cfg, out_dir=tmp_path / "b"))
    other = generate(replace(cfg, out_dir=tmp_path / "c", seed=7))
    for a, b, c in zip(first.image_paths, second.image_paths, other.image_paths, strict=True):
        assert np.array_equal(_png(a), _png(b))
        assert not np.array_equal(_png(a), _png(c))


def test_cfg_mode_is_vanilla_cfg_of_flow_sample(pixel_dir, tmp_path):
    """--guidance-mode cfg: the images of flow.sample(guidance="cfg") from the same seeds."""
    from gmflow.model_loading import decode_images, load_model

    cfg = _config(tmp_path / "cfg", pretrained=str(pixel_dir), solver="euler", num_substeps=None,
                  guidance_mode="cfg", guidance_scale=2.5, class_ids=(1, 2))  # fmt: skip
    result = generate(cfg)
    sampler = json.loads(result.manifest_path.read_text())["sampler"]
    assert (sampler["guidance_mode"], sampler["orthogonal_guidance"]) == ("cfg", 0.0)
    model = load_model(cfg)
    noise = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(42 + i))
                         for i in range(2)])  # fmt: skip
    x0 = sample(model.denoiser, noise, solver="euler", num_steps=2, guidance="cfg",
                guidance_scale=2.5, null_class_id=1000, shift=1.5,
                class_labels=torch.tensor([1, 2]))  # fmt: skip
    expected = (decode_images(x0, model.vae) * 255).round().permute(0, 2, 3, 1).numpy()
    for path, image in zip(result.image_paths, expected, strict=True):
        assert np.abs(_png(path) - image).max() <= 1
    # g = 1 is no guidance: the images of probabilistic w = 0
    off = generate(replace(cfg, out_dir=tmp_path / "g1", guidance_scale=1.0))
    plain = generate(replace(cfg, out_dir=tmp_path / "w0", guidance_mode="probabilistic",
                             guidance_scale=0.0))  # fmt: skip
    for a, b in zip(off.image_paths, plain.image_paths, strict=True):
        assert np.array_equal(_png(a), _png(b))
    assert not np.array_equal(_png(off.image_paths[0]), _png(result.image_paths[0]))


def test_generate_equals_the_pipeline_call_through_the_vae(latent_dir, tmp_path):
    from gmflow.pipelines import GMDiTPipeline

    result = generate(
        _config(
            tmp_path / "out", pretrained=str(latent_dir), class_ids=(5,), seed=7, num_substeps=3
        )
    )
    pipe = GMDiTPipeline.from_pretrained(latent_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [5],
        guidance_scale=0.3,
        num_inference_steps=2,
        num_inference_substeps=3,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images
    png = _png(result.image_paths[0])
    assert png.shape == (16, 16, 3)  # 8x8 latents through a 2x VAE
    assert np.abs(png - np.round(images[0] * 255)).max() <= 1


def test_samples_json_records_settings_and_seeds(pixel_dir, tmp_path):
    result = generate(
        _config(tmp_path, pretrained=str(pixel_dir), solver="ddpm", classes=("jay", "magpie"),
                class_ids=(), num_per_class=2, num_substeps=None)
    )  # fmt: skip
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["settings"]["solver"] == "ddpm" and manifest["settings"]["classes"] == [
        "jay",
        "magpie",
    ]
    assert manifest["sampler"]["shift"] == 1.5  # the pipeline scheduler's shift
    assert [(s["class_name"], s["class_id"], s["seed"]) for s in manifest["samples"]] == [
        ("jay", 17, 42),
        ("jay", 17, 43),
        ("magpie", 18, 44),
        ("magpie", 18, 45),
    ]
    assert all((tmp_path / s["file"]).is_file() for s in manifest["samples"])
    grid = _png(result.grid_path)
    assert grid.shape == (16, 16, 3)  # two rows (classes) of two 8x8 samples
    assert np.array_equal(grid[8:, :8], _png(result.image_paths[2]))


def _write_run(run_dir: Path, in_channels: int = 3) -> tuple[RunConfig, torch.nn.Module]:
    from gmflow.training.build import build_objective
    from gmflow.training.checkpoint import save_checkpoint

    cfg = RunConfig(
        model=ModelConfig(
            preset="custom",
            hidden_size=16,
            depth=1,
            num_heads=2,
            num_gaussians=2,
            in_channels=in_channels,
            sample_size=8,
            num_classes=10,
            logstd_inner_dim=8,
            spectrum_layers=(8,),
        ),
        data=DataConfig(kind="shards", path=str(run_dir / "no_dataset")),
    )
    objective = build_objective(cfg)
    ema = build_objective(cfg)
    for p in ema.parameters():
        p.data.normal_(0, 0.05)
    run_dir.mkdir(parents=True)
    dump_recipe(cfg, run_dir / "config.yaml")
    save_checkpoint(
        run_dir, 3, model_state=objective.state_dict(), ema_state=ema.state_dict(), train_state={}
    )
    return cfg, ema.eval()


def test_run_folder_samples_its_ema_weights(tmp_path):
    _, ema = _write_run(tmp_path / "run")
    cfg = SampleConfig(
        out_dir=tmp_path / "out", run=tmp_path / "run", vae="none", class_ids=(4,), num_steps=2,
        solver="gm-ode", num_substeps=3, guidance_scale=0.2, seed=3,
    )  # fmt: skip
    result = generate(cfg)
    noise = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(3))[None]
    x0 = sample(
        ema.denoiser, noise, solver="gm-ode", num_steps=2, num_substeps=3, guidance_scale=0.2,
        null_class_id=10,
        class_labels=torch.tensor([4]),
    )  # fmt: skip
    expected = ((x0[0] / 2 + 0.5).clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()
    assert np.abs(_png(result.image_paths[0]) - expected).max() <= 1
    with pytest.raises(CheckpointError, match="--vae"):
        generate(replace(cfg, vae=None))


def test_step_picks_a_checkpoint_of_the_run(tmp_path):
    """--step N samples the EMA weights saved at step N; the default is the latest checkpoint."""
    from gmflow.training.build import build_objective, load_run
    from gmflow.training.checkpoint import save_checkpoint

    cfg_run, ema3 = _write_run(tmp_path / "run")  # a checkpoint at step 3
    ema5 = build_objective(cfg_run)
    for p in ema5.parameters():
        p.data.normal_(0, 0.05)
    state = ema5.state_dict()
    save_checkpoint(tmp_path / "run", 5, model_state=state, ema_state=state, train_state={})
    for step, want in ((3, ema3), (5, ema5), (None, ema5)):
        _, denoiser, _ = load_run(tmp_path / "run", step=step)
        for (name, got), ref in zip(denoiser.state_dict().items(),
                                    want.denoiser.state_dict().values(), strict=True):  # fmt: skip
            assert torch.equal(got, ref), (step, name)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint at step 4; .* \[3, 5\]"):
        load_run(tmp_path / "run", step=4)
    cfg = SampleConfig(out_dir=tmp_path / "a", run=tmp_path / "run", vae="none", class_ids=(2,),
                       num_steps=2, solver="euler", step=3)  # fmt: skip
    old = generate(cfg)
    new = generate(replace(cfg, out_dir=tmp_path / "b", step=None))
    assert not np.array_equal(_png(old.image_paths[0]), _png(new.image_paths[0]))
    assert json.loads(old.manifest_path.read_text())["settings"]["step"] == 3


def test_run_folder_errors(tmp_path):
    from gmflow.training.build import build_objective
    from gmflow.training.checkpoint import save_checkpoint

    _write_run(tmp_path / "latent", in_channels=4)
    cfg = SampleConfig(out_dir=tmp_path / "o", run=tmp_path / "latent", vae="none", class_ids=(1,))
    with pytest.raises(ConfigError, match="4-channel data without a VAE"):
        generate(cfg)
    toy = RunConfig(
        model=ModelConfig(
            arch="mlp2d", in_channels=2, sample_size=1, use_spectrum_net=False, hidden_dim=8
        )
    )
    (tmp_path / "toy").mkdir()
    dump_recipe(toy, tmp_path / "toy" / "config.yaml")
    state = build_objective(toy).state_dict()
    save_checkpoint(tmp_path / "toy", 1, model_state=state, ema_state=None, train_state={})
    with pytest.raises(ConfigError, match="gmflow toy"):
        generate(replace(cfg, run=tmp_path / "toy"))
    with pytest.raises(CheckpointError, match="no config.yaml"):
        generate(replace(cfg, run=tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pretrained=None), "exactly one model"),
        (dict(run=Path("run")), "exactly one model"),
        (dict(solver="dpm++"), "unknown solver 'dpm\\+\\+'"),
        (dict(solver="gm-sde2", num_substeps=4), "only used by the GM-ODE solvers"),
        (dict(num_substeps=0), "num_substeps must be an integer >= 1"),
        (dict(guidance_scale=1.0), r"outside \[0, 1\)"),
        (dict(guidance_scale=-0.1), r"outside \[0, 1\)"),
        (dict(classes=("jay",)), "exactly one of --classes"),
        (dict(class_ids=()), "exactly one of --classes"),
        (dict(dtype="fp16"), "--dtype 'fp16'"),
        (dict(device="tpu"), "--device 'tpu'"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(class_ids=(3, -1)), "class id must be an integer >= 0, got -1"),
        (dict(vae="none"), "--run only"),
        (dict(step=3), "--step picks a checkpoint of a --run"),
        (dict(pretrained=None, run=Path("run"), step=-1), "step must be an integer >= 0"),
        (dict(orthogonal_guidance=1.5), "--orthogonal-guidance 1.5"),
        (dict(guidance_mode="cfg", guidance_scale=0.5), "with --guidance-mode cfg it is the CFG"),
        (dict(guidance_mode="classifier"), "--guidance-mode 'classifier'; expected one of"),
        (dict(guidance_scale=2.0), "for CFG pass --guidance-mode cfg"),
    ],
)
def test_config_errors(kwargs, match, tmp_path):
    base = dict(out_dir=tmp_path, pretrained="somewhere", class_ids=(1,))
    with pytest.raises(ConfigError, match=match):
        SampleConfig(**{**base, **kwargs})


def test_class_and_device_errors(pixel_dir, tmp_path):
    cfg = _config(tmp_path, pretrained=str(pixel_dir))
    with pytest.raises(ConfigError, match="did you mean 'magpie'"):
        generate(replace(cfg, class_ids=(), classes=("magpi",)))
    with pytest.raises(ConfigError, match=r"outside \[0, 1000\]"):
        generate(replace(cfg, class_ids=(1001,)))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            generate(replace(cfg, device="cuda"))
    with pytest.raises(CheckpointError, match="neither an existing folder nor a hub id"):
        generate(replace(cfg, pretrained=str(tmp_path / "nothing")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "solver", ["gm-ode2", "gm-sde2", "gm-ode", "gm-sde", "euler", "heun", "ddpm"]
)
def test_cuda_sampling_matches_cpu_and_is_reproducible(solver, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch-embedding conv
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _write_run(tmp_path / "run")
    cfg = SampleConfig(
        out_dir=tmp_path / "cpu", run=tmp_path / "run", vae="none", class_ids=(1, 4, 7),
        num_steps=3, solver=solver, num_substeps=2 if solver.startswith("gm-ode") else None,
        guidance_scale=0.3, batch_size=2,
    )  # fmt: skip
    cpu = generate(cfg)
    cuda = generate(replace(cfg, out_dir=tmp_path / "cuda", device="cuda"))
    again = generate(replace(cfg, out_dir=tmp_path / "again", device="cuda"))
    for a, b, c in zip(cpu.image_paths, cuda.image_paths, again.image_paths, strict=True):
        assert np.array_equal(_png(b), _png(c))  # seeded CUDA runs repeat exactly
        if solver not in ("gm-sde2", "gm-sde", "ddpm"):  # same noise, deterministic solver
            assert np.abs(_png(a) - _png(b)).max() <= 2


@pytest.mark.slow  # a fresh interpreter importing torch
def test_run_sampling_does_not_need_diffusers():
    """`gmflow sample --run` without a VAE works where diffusers is not installed."""
    import subprocess
    import sys

    code = "import sys, gmflow.sampling, gmflow.pipelines.labels; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("solver", "guidance"),
    [("gm-ode2", 0.45), ("gm-sde2", 0.45), ("gm-sde2", 0.0), ("euler", 0.45)],
)
def test_cuda_sampler_steps_never_wait_for_the_gpu(solver, guidance):
    """A whole guided run (network included) reads no CUDA tensor back, so the host queues the
    GM machinery while the network still runs: what makes it nearly free end to end (issue 4)."""
    from gmflow.flow import sample
    from gmflow.models.gmdit import build_gmdit
    from gmflow.models.spectrum import SpectrumMLP

    torch.manual_seed(0)
    model = build_gmdit("S/2", num_gaussians=4, sample_size=16, num_classes=10, depth=2)
    model = model.cuda().eval()
    args = {
        "gm-ode2": {"solver": "gm-ode", "order": 2, "num_substeps": 2},
        "gm-sde2": {"solver": "gm-sde", "order": 2,
                    "spectrum_net": SpectrumMLP(base_size=(4, 16, 16)).cuda().eval()},
        "euler": {"solver": "euler"},
    }[solver]  # fmt: skip
    noise = torch.randn(2, 4, 16, 16, device="cuda")
    labels = torch.tensor([1, 2], device="cuda")

    def run() -> torch.Tensor:
        gen = torch.Generator(device="cuda").manual_seed(0)
        return sample(model, noise, num_steps=3, guidance_scale=guidance, null_class_id=10,
                      class_labels=labels, generator=gen, **args)  # fmt: skip

    with torch.no_grad():
        run()  # warm-up: kernel compiles and backend probes synchronise once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert bool(torch.isfinite(out).all())
