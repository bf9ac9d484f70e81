"""``gmflow sample``: option parsing into SampleConfig, real runs for every solver, error exits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gmflow.sampling
from gmflow.sampling import SOLVERS, SampleResult
from gmflow_cli import main as cli_main


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``gmflow sample ARGS`` through the console entry point: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["sample", *args])
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    """A tiny random pixel-space pipeline and one with a tiny random AutoencoderKL."""
    from diffusers import AutoencoderKL

    from gmflow.pipelines import (
        FlowEulerODEScheduler,
        GMDiTPipeline,
        GMDiTTransformer2DModel,
        SpectrumMLPModel,
    )

    torch.manual_seed(0)
    folders = {}
    for kind, channels in (("pixel", 3), ("latent", 4)):
        transformer = GMDiTTransformer2DModel(
            num_gaussians=2, logstd_inner_dim=8, num_attention_heads=2, attention_head_dim=8,
            in_channels=channels, num_layers=1, sample_size=8,
        )  # fmt: skip
        spectrum = SpectrumMLPModel(base_size=(channels, 8, 8), layers=(8,))
        for p in [*transformer.parameters(), *spectrum.parameters()]:
            p.data.normal_(0, 0.05)
        vae = None
        if kind == "latent":
            vae = AutoencoderKL(
                block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4
            )
        folders[kind] = tmp_path_factory.mktemp(kind)
        GMDiTPipeline(
            transformer=transformer,
            scheduler=FlowEulerODEScheduler(),
            spectrum_net=spectrum,
            vae=vae,
        ).save_pretrained(folders[kind])
    return folders


@pytest.fixture
def captured(monkeypatch) -> list:  # type: ignore[type-arg]
    """Replace the library entry point; record the SampleConfig it receives."""
    configs = []

    def fake_generate(cfg, progress=None):  # type: ignore[no-untyped-def]
        configs.append(cfg)
        return SampleResult(
            cfg.out_dir, (), cfg.out_dir / "grid.png", cfg.out_dir / "s.json", (), (), 0.0
        )

    monkeypatch.setattr(gmflow.sampling, "generate", fake_generate)
    return configs


def test_options_reach_sample_config(captured, capsys, tmp_path):
    code, _, _ = _run(
        ["--pretrained", "DIR", "--classes", "jay", "magpie", "--out-dir", str(tmp_path)], capsys
    )
    assert code == 0
    cfg = captured[-1]
    assert cfg.classes == ("jay", "magpie") and cfg.class_ids == () and cfg.pretrained == "DIR"
    assert (cfg.solver, cfg.num_steps, cfg.num_substeps, cfg.guidance_scale, cfg.seed) == (
        "gm-ode2", 32, None, 0.45, 42,
    )  # fmt: skip
    assert (cfg.batch_size, cfg.dtype, cfg.device, cfg.out_dir) == (16, "fp32", "cpu", tmp_path)
    args = ["--run", "RUN", "--class-ids", "17", "18", "--solver", "gm-ode", "--substeps", "4",
            "--steps", "8", "--guidance", "0", "--seed", "3", "--batch-size", "2", "--dtype",
            "bf16", "--num-per-class", "5", "--vae", "none", "--out-dir", "o"]  # fmt: skip
    assert _run(args, capsys)[0] == 0
    cfg = captured[-1]
    assert cfg.class_ids == (17, 18) and cfg.run == Path("RUN") and cfg.num_substeps == 4
    assert (cfg.num_steps, cfg.guidance_scale, cfg.seed, cfg.batch_size) == (8, 0.0, 3, 2)
    assert (cfg.dtype, cfg.num_per_class, cfg.vae) == ("bf16", 5, "none")
    assert cfg.step is None
    assert _run([*args, "--step", "1000"], capsys)[0] == 0 and captured[-1].step == 1000
    args = [
        "--pretrained",
        "D",
        "--classes",
        "jay",
        "--classes",
        "great white shark",
        "--out-dir",
        "o",
    ]
    assert _run(args, capsys)[0] == 0
    assert captured[-1].classes == ("jay", "great white shark")
    cfg = captured[-1]  # the sampler-tuning options keep the paper's defaults
    assert (cfg.orthogonal, cfg.guidance_interval, cfg.gm2_coefs) == (
        1.0, None, (0.005, 1.0),
    )  # fmt: skip
    assert (cfg.gm2_correction_steps, cfg.shift, cfg.guidance_mode) == (0, None, "probabilistic")
    args = ["--pretrained", "D", "--class-ids", "3", "--orthogonal-guidance", "0.5",
            "--guidance-interval", "0.1", "0.9", "--gm2-coefs", "0.01", "2", "--shift", "3",
            "--gm2-correction-steps", "2", "--out-dir", "o"]  # fmt: skip
    assert _run(args, capsys)[0] == 0
    cfg = captured[-1]
    assert (cfg.orthogonal_guidance, cfg.guidance_interval, cfg.gm2_coefs) == (
        0.5, (0.1, 0.9), (0.01, 2.0),
    )  # fmt: skip
    assert (cfg.gm2_correction_steps, cfg.shift, cfg.class_ids) == (2, 3.0, (3,))


def test_sampler_options_reach_the_run_and_its_manifest(pipelines, capsys, tmp_path):
    args = ["--pretrained", str(pipelines["pixel"]), "--solver", "gm-ode2", "--class-ids", "1",
            "--steps", "3", "--substeps", "2", "--guidance", "0.3", "--orthogonal-guidance", "0",
            "--guidance-interval", "0.2", "0.8", "--gm2-coefs", "0.01", "0.5",
            "--gm2-correction-steps", "1", "--shift", "2.5",
            "--out-dir", str(tmp_path / "a")]  # fmt: skip
    code, _, err = _run(args, capsys)
    assert code == 0, err
    sampler = json.loads((tmp_path / "a" / "samples.json").read_text())["sampler"]
    assert (sampler["orthogonal_guidance"], sampler["guidance_interval"]) == (0.0, [0.2, 0.8])
    assert (sampler["gm2_coefs"], sampler["gm2_correction_steps"]) == ([0.01, 0.5], 1)
    assert sampler["shift"] == 2.5
    default = args[:12] + ["--out-dir", str(tmp_path / "b")]  # same up to --guidance 0.3
    assert _run(default, capsys)[0] == 0
    png = sorted((tmp_path / "a").glob("sample-*.png"))[0].read_bytes()
    assert png != sorted((tmp_path / "b").glob("sample-*.png"))[0].read_bytes()


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_writes_images_in_pixel_space(solver, pipelines, capsys, tmp_path):
    args = ["--pretrained", str(pipelines["pixel"]), "--solver", solver, "--classes", "jay",
            "magpie", "--steps", "2", "--out-dir", str(tmp_path)]  # fmt: skip
    if solver.startswith("gm-ode"):
        args += ["--substeps", "2"]
    code, out, err = _run(args, capsys)
    assert code == 0, err
    assert "2 images in" in out
    manifest = json.loads((tmp_path / "samples.json").read_text())
    assert (manifest["sampler"]["solver"], manifest["sampler"]["order"]) == SOLVERS[solver]
    assert [s["class_id"] for s in manifest["samples"]] == [17, 18]
    assert len(list(tmp_path.glob("sample-*.png"))) == 2 and (tmp_path / "grid.png").is_file()


def test_latent_pipeline_decodes_through_its_vae(pipelines, capsys, tmp_path):
    from PIL import Image

    args = ["--pretrained", str(pipelines["latent"]), "--solver", "gm-sde2", "--class-ids", "1",
            "--steps", "2", "--out-dir", str(tmp_path)]  # fmt: skip
    code, _, err = _run(args, capsys)
    assert code == 0, err
    (png,) = tmp_path.glob("sample-*.png")
    assert Image.open(png).size == (8, 8) and Image.open(png).mode == "RGB"  # 4 latent channels
    assert json.loads((tmp_path / "samples.json").read_text())["model"]["vae"].endswith("vae")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--solver", "dpm"], "unknown solver 'dpm'"),
        (["--classes", "jya"], "unknown class name 'jya' (did you mean 'jay'"),
        (["--guidance", "1.0"], "--guidance 1.0 is outside [0, 1)"),
        (["--solver", "gm-sde2", "--substeps", "4"], "only used by the GM-ODE solvers"),
        (["--run", "runs/x"], "exactly one model"),
        (["--orthogonal-guidance", "1.5"], "--orthogonal-guidance 1.5 is outside [0, 1]"),
        (["--guidance-interval", "0.9", "0.1"], "0 <= sigma_a <= sigma_b <= 1"),
        (["--solver", "gm-ode", "--gm2-correction-steps", "2"], "refines the order-2"),
        (["--gm2-coefs", "-1", "1"], "--gm2-coefs"),
        (["--shift", "0"], "--shift 0.0 must be a finite number > 0"),
        (["--sde-h", "0.5"], "--sde-h 0.5 sets the FlowSDE step of the ddpm baseline"),
        (["--guidance-mode", "cfg"], "--guidance 0.45 is below 1: with --guidance-mode cfg"),
        (["--solver", "ddpm", "--sde-h", "-1"], "--sde-h -1.0 must be a finite number >= 0"),
    ],
)
def test_bad_options_exit_1_with_a_message(args, message, pipelines, capsys, tmp_path):
    base = ["--pretrained", str(pipelines["pixel"]), "--out-dir", str(tmp_path)]
    if "--classes" not in args:
        base += ["--class-ids", "1"]
    code, _, err = _run(base + args, capsys)
    assert code == 1 and message in err


def test_missing_weights_exit_1_naming_what_was_tried(capsys, tmp_path, monkeypatch):
    code, _, err = _run(["--class-ids", "1", "--out-dir", str(tmp_path)], capsys)
    assert code == 1 and "exactly one model" in err
    code, _, err = _run(
        ["--pretrained", str(tmp_path), "--class-ids", "1", "--out-dir", "o"], capsys
    )
    assert code == 1 and f"{tmp_path} has no model_index.json" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--pretrained", "gmflow-tests/absent-repo", "--class-ids", "1", "--out-dir", "o"]
    code, _, err = _run(args, capsys)
    assert code == 1
    assert "'gmflow-tests/absent-repo'" in err and "hf download gmflow-tests/absent-repo" in err
    code, _, err = _run(["--run", str(tmp_path), "--class-ids", "1", "--out-dir", "o"], capsys)
    assert code == 1 and "has no config.yaml" in err


def test_malformed_values_are_usage_errors(capsys):
    code, _, err = _run(["--pretrained", "D", "--class-ids", "17", "x", "--out-dir", "o"], capsys)
    assert code == 2 and "class ids must be integers" in err
    code, _, err = _run(
        ["--pretrained", "D", "--class-ids", "1", "--substeps", "many", "--out-dir", "o"], capsys
    )
    assert code == 2 and "'auto'" in err
