"""``gmflow evaluate``: multi-value options, recipe precedence, a real run, error exits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import gmflow.evaluation
from gmflow.evaluation import EvalConfig, EvalResult
from gmflow.evaluation.config import PAPER_GUIDANCE_SCALES
from gmflow_cli import main as cli_main
from gmflow_cli.commands.evaluate import expand_multi_value

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``gmflow evaluate ARGS`` through the console entry point: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["evaluate", *args])
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


@pytest.fixture
def captured(monkeypatch, tmp_path) -> list[EvalConfig]:
    """Patch the library entry point; record the configs it receives."""
    seen: list[EvalConfig] = []

    def fake(cfg: EvalConfig, **kwargs) -> EvalResult:  # type: ignore[no-untyped-def]
        seen.append(cfg)
        paths = {"results": tmp_path / "results.jsonl", "summary_md": tmp_path / "summary.md"}
        timings = dict.fromkeys(("sampling", "decoding", "reference", "features", "metrics"), 0.0)
        return EvalResult(tmp_path, (), (), paths, timings)

    monkeypatch.setattr(gmflow.evaluation, "evaluate", fake)
    return seen


def test_expand_multi_value_options():
    args = ["--steps", "8", "32", "--solvers", "a", "b", "--seed", "0", "--guidance-sweep", "0.1"]
    assert expand_multi_value(args) == [
        "--steps", "8", "--steps", "32", "--solvers", "a", "--solvers", "b", "--seed", "0",
        "--guidance-sweep", "0.1",
    ]  # fmt: skip
    assert expand_multi_value(["--steps", "--seed", "1"]) == ["--steps", "--seed", "1"]
    assert expand_multi_value(["--steps", "8", "--", "--steps", "9"]) == [
        "--steps", "8", "--", "--steps", "9"
    ]  # fmt: skip


def test_space_separated_lists_reach_the_config(captured, capsys, tmp_path):
    code, _, err = _run(
        ["--pretrained", "P", "--reference", "R.npz", "--solvers", "gm-ode2", "gm-sde2",
         "--steps", "8", "32", "--guidance-sweep", "0.04", "0.45", "--num-samples", "100",
         "--batch-size", "10", "--seed", "3", "--out-dir", str(tmp_path / "o")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    (cfg,) = captured
    assert (cfg.solvers, cfg.steps, cfg.guidance_scales) == (
        ("gm-ode2", "gm-sde2"),
        (8, 32),
        (0.04, 0.45),
    )
    assert (cfg.num_samples, cfg.batch_size, cfg.seed, cfg.pretrained) == (100, 10, 3, "P")


def test_paper_sweep_and_repeated_flags(captured, capsys):
    code, _, err = _run(
        [
            "--run",
            "RUN",
            "--reference",
            "R",
            "--guidance-sweep",
            "paper",
            "--steps",
            "8",
            "--steps",
            "16",
        ],
        capsys,
    )
    assert code == 0, err
    assert captured[0].guidance_scales == PAPER_GUIDANCE_SCALES and captured[0].steps == (8, 16)
    assert captured[0].run == Path("RUN") and captured[0].pretrained is None


def test_recipe_then_flags_then_set(captured, capsys):
    recipe = REPO / "recipes" / "eval_imagenet256_fid50k.yaml"
    code, _, err = _run(
        ["--recipe", str(recipe), "--run", "RUN", "--reference", "R.npz", "--num-samples", "100",
         "--set", "num_samples=200", "--set", "keep_samples=false", "--set", "variant=null"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    (cfg,) = captured
    assert cfg.run == Path("RUN") and cfg.pretrained is None  # --run replaces the recipe's model
    assert (cfg.reference, cfg.num_samples, cfg.keep_samples) == ("R.npz", 200, False)
    assert cfg.guidance_scales == PAPER_GUIDANCE_SCALES and cfg.dtype == "bf16"  # from the recipe
    code, _, err = _run(["--run", "RUN", "--step", "4000", "--reference", "R.npz"], capsys)
    assert code == 0, err
    assert captured[-1].step == 4000 and captured[-1].sample_settings()["step"] == 4000
    code, _, err = _run(["--pretrained", "P", "--step", "4000", "--reference", "R.npz"], capsys)
    assert code == 1 and "--step picks a checkpoint of a --run" in err


def test_dry_run_prints_the_resolved_config(capsys):
    code, out, _ = _run(
        ["--pretrained", "P", "--reference", "R", "--guidance-sweep", "0.1", "--dry-run"], capsys
    )
    assert code == 0 and "guidance_scales:\n- 0.1\n" in out
    code, out, _ = _run(
        ["--pretrained", "P", "--reference", "R", "--guidance-mode", "cfg", "--guidance-sweep",
         "1.5", "4", "--dry-run"], capsys,
    )  # fmt: skip
    assert code == 0 and "guidance_scales:\n- 1.5\n- 4.0\n" in out and "guidance_mode: cfg" in out
    code, out, _ = _run(
        ["--pretrained", "P", "--reference", "R", "--guidance-interval", "0.2", "0.8",
         "--dry-run"], capsys,
    )  # fmt: skip
    assert code == 0 and "guidance_interval:\n- 0.2\n- 0.8\n" in out


@pytest.mark.parametrize(
    ("args", "code", "match"),
    [
        (["--pretrained", "P", "--reference", "R", "--guidance-sweep", "1.5"], 1, "outside [0, 1)"),
        (
            ["--pretrained", "P", "--reference", "R", "--guidance-sweep", "lots"],
            2,
            "expected 'paper'",
        ),
        (["--reference", "R"], 1, "exactly one model"),
        (["--pretrained", "P"], 1, "no reference set"),
        (["--pretrained", "P", "--reference", "R", "--solvers", "rk4"], 1, "unknown solvers"),
        (["--pretrained", "P", "--reference", "R", "--guidance-mode", "cfg"], 1, "are below 1"),
    ],
)
def test_bad_options_exit_with_a_message(args, code, match, capsys, captured):
    got, _, err = _run(args, capsys)
    assert got == code and match in " ".join(err.split()) and not captured


# ---- unpatched runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_setup(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny pixel-space pipeline and a 16-image reference .npz."""
    from gmflow.pipelines import FlowEulerODEScheduler, GMDiTPipeline, GMDiTTransformer2DModel

    torch.manual_seed(0)
    transformer = GMDiTTransformer2DModel(
        num_gaussians=2, logstd_inner_dim=8, num_attention_heads=2, attention_head_dim=8,
        in_channels=3, num_layers=1, sample_size=8, num_embeds_ada_norm=10,
    )  # fmt: skip
    for p in transformer.parameters():
        p.data.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("cli_pipeline")
    GMDiTPipeline(transformer=transformer, scheduler=FlowEulerODEScheduler()).save_pretrained(
        folder
    )
    ref = folder / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    return folder, ref


def test_missing_inception_weights_exit_before_sampling(small_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline, ref = small_setup
    code, _, err = _run(
        ["--pretrained", str(pipeline), "--reference", str(ref), "--out-dir", str(tmp_path / "o"),
         "--solvers", "euler", "--steps", "1", "--guidance-sweep", "0.1", "--num-samples", "4"],
        capsys,
    )  # fmt: skip
    text = " ".join(err.split())
    assert code == 1 and "weights-inception-2015-12-05-6726825d.pth" in text
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in text and "--inception-weights" in text
    assert not (tmp_path / "o" / "points").exists()


def test_a_real_run_prints_the_summary_table(small_setup, tmp_path, monkeypatch, capsys):
    """Unpatched command with a cheap extractor in place of Inception (no weights needed)."""
    import gmflow.evaluation.fid as fid

    class Cheap:
        extractor_id = "cheap/1"

        def __init__(self, weights, device) -> None:  # type: ignore[no-untyped-def]
            pass

        def __call__(self, images):  # type: ignore[no-untyped-def]
            x = images.double().flatten(1)[:, :12] / 255
            return x.float(), x[:, :5].float()

    monkeypatch.setattr(fid, "InceptionFeatures", Cheap)
    monkeypatch.setattr(fid, "resolve_inception_weights", lambda path: Path("unused"))
    pipeline, ref = small_setup
    out_dir = tmp_path / "o"
    code, out, err = _run(
        ["--pretrained", str(pipeline), "--reference", str(ref), "--out-dir", str(out_dir),
         "--solvers", "euler", "--steps", "1", "--guidance-sweep", "0", "0.3", "--num-samples", "6",
         "--batch-size", "3", "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    best = min(rows, key=lambda r: r["fid"])
    assert "best FID" in out and "euler" in out and f"{best['fid']:.2f}" in out
    assert f"results: {out_dir / 'results.jsonl'}" in " ".join(out.split())
