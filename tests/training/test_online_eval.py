"""In-training FID (``online_eval``): the numbers of ``gmflow evaluate`` on the same checkpoint,
bad settings refused at load time or before step 0, and the training itself left untouched."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gmflow.config import dump_recipe, from_dict, to_dict
from gmflow.errors import ConfigError, DataError
from gmflow.evaluation import EvalConfig, evaluate
from gmflow.run_config import OnlineEvalConfig, RunConfig
from gmflow.training import train
from gmflow.training.checkpoint import list_checkpoints
from gmflow.training.distributed import DistInfo
from gmflow.training.online_eval import _share, prepare_online_eval

ONLINE = {
    "every": 3,
    "num_samples": 10,
    "batch_size": 4,
    "feature_batch_size": 6,
    "solver": "gm-ode2",
    "num_steps": 2,
    "num_substeps": 2,
    "guidance_scale": 0.2,
}


def _recipe(data: Path, reference: Path, **online) -> RunConfig:
    return from_dict(
        {
            "model": {
                "arch": "gmdit", "preset": "custom", "hidden_size": 32, "depth": 1,
                "num_heads": 2, "patch_size": 2, "num_gaussians": 3, "in_channels": 3,
                "sample_size": 8, "num_classes": 3, "logstd_inner_dim": 16,
            },
            "data": {
                "kind": "shards", "path": str(data), "num_workers": 0, "shuffle_buffer": 16,
                "random_flip": False,
            },
            "optim": {"lr": 1e-3, "warmup_steps": 2, "grad_clip_from_step": 0},
            "ema": {"kind": "karras"},
            "validation": {"every": 0},
            "online_eval": {**ONLINE, "reference": str(reference), **online},
            "train": {
                "max_steps": 3, "global_batch_size": 8, "batch_size_per_device": 8,
                "device": "cpu", "precision": "fp32", "checkpoint_every": 3,
                "checkpoint_milestones": [], "log_every": 1, "use_tensorboard": False,
            },
        },
        RunConfig,
    )  # fmt: skip


def _eval_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/fid" in r]


@pytest.mark.parametrize("solver", ["gm-ode2", "gm-sde2"])
def test_online_metrics_equal_gmflow_evaluate_on_the_checkpoint(
    pixel_shards, reference_npz, stub, tmp_path, solver, caplog
):
    """Same images (seeds of spec 11.2), features and metrics as the offline evaluation."""
    cfg = _recipe(pixel_shards, reference_npz, solver=solver)
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="gmflow.training.online_eval"):
        train(cfg, run, eval_extractor=stub)
    progress = [r.getMessage() for r in caplog.records if "online evaluation " in r.getMessage()]
    # 10 samples in batches of 4: progress after 4 and 8 samples, not at the end
    assert [m.split("(")[1].split(" samples")[0] for m in progress] == ["4/10", "8/10"], progress
    assert progress[0].startswith("step 3: online evaluation 40% (") and "s left)" in progress[0]
    (row,) = _eval_rows(run)
    assert row["step"] == 3
    assert {"eval/fid", "eval/is", "eval/precision", "eval/recall"} <= row.keys()
    assert row["eval/fid"] > 0 and row["eval/is"] >= 1
    assert list((run / "online_eval" / "reference").glob("reference-*.npz"))
    offline = evaluate(
        EvalConfig(
            run=run, step=3, vae="none", device="cpu", reference=str(reference_npz),
            out_dir=tmp_path / "eval", solvers=(solver,), steps=(2,), num_substeps=2,
            guidance_scales=(0.2,), num_samples=10, batch_size=4, shard_size=5, seed=0,
            feature_batch_size=6,
        ),
        extractor=stub,
    ).rows[0]  # fmt: skip
    for key in ("fid", "is", "precision", "recall"):
        assert row[f"eval/{key}"] == pytest.approx(offline[key], rel=1e-6, abs=1e-9), key


def test_online_evaluation_leaves_the_training_unchanged(
    pixel_shards, reference_npz, stub, tmp_path
):
    """Weights and EMA are bit-identical with and without the evaluation (it forks the RNG)."""
    cfg = _recipe(pixel_shards, reference_npz, every=1)
    cfg = replace(cfg, train=replace(cfg.train, max_steps=4, checkpoint_every=4))
    train(cfg, tmp_path / "with", eval_extractor=stub)
    assert [r["step"] for r in _eval_rows(tmp_path / "with")] == [1, 2, 3, 4]
    train(replace(cfg, online_eval=OnlineEvalConfig()), tmp_path / "no")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(list_checkpoints(tmp_path / d)[-1][1] / name) for d in ("with", "no"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"


def test_shares_cover_every_index_once_in_order():
    for n, w in [(10, 1), (10, 3), (7, 7), (50_000, 8)]:
        shares = [_share(n, r, w) for r in range(w)]
        assert [i for s in shares for i in s] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize(
    ("online", "match"),
    [
        ({"every": 5, "reference": None}, "needs online_eval.reference"),
        ({"every": -1}, "every must be >= 0"),
        ({"solver": "dpm"}, "unknown 'dpm'"),
        ({"guidance_scale": 1.5}, r"\[0, 1\)"),
        ({"num_samples": 3}, "more than 3 samples"),
        ({"num_substeps": 0}, "num_substeps must be >= 1"),
        ({"seed": 500}, "seed must lie in"),
    ],
)
def test_bad_settings_are_recipe_errors(online, match, tmp_path):
    cfg = to_dict(_recipe(tmp_path, tmp_path / "ref.npz"))
    cfg["online_eval"].update(online)
    with pytest.raises(ConfigError, match=match):
        from_dict(cfg, RunConfig)


def test_the_2d_toy_has_no_fid():
    with pytest.raises(ConfigError, match="image models"):
        from_dict(
            {
                "model": {"arch": "mlp2d", "in_channels": 2, "sample_size": 1,
                          "use_spectrum_net": False},
                "data": {"kind": "checkerboard"},
                "online_eval": {"every": 10, "reference": "ref.npz"},
            },
            RunConfig,
        )  # fmt: skip


def test_problems_surface_before_step_0(pixel_shards, reference_npz, stub, tmp_path):
    def prepare(**online):
        cfg = _recipe(pixel_shards, online.pop("reference", reference_npz), **online)
        return prepare_online_eval(cfg, tmp_path / "run", DistInfo(), extractor=stub)

    with pytest.raises(DataError):
        prepare(reference=tmp_path / "missing.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(16), sigma=np.eye(16))
    with pytest.raises(ConfigError, match="precision_recall: false"):
        prepare(reference=tmp_path / "stats.npz")
    assert prepare(reference=tmp_path / "stats.npz", precision_recall=False) is not None
    with pytest.raises(ConfigError, match="no VAE decodes"):
        latent = _recipe(pixel_shards, reference_npz)
        latent = replace(latent, model=replace(latent.model, in_channels=4))
        prepare_online_eval(latent, tmp_path / "run", DistInfo(), extractor=stub)
    with pytest.raises(ConfigError, match="fewer than the 4 processes"):
        few = _recipe(pixel_shards, reference_npz, num_samples=3, precision_recall=False)
        prepare_online_eval(few, tmp_path / "run", DistInfo(world_size=4), extractor=stub)
    assert prepare(every=0) is None


def test_missing_inception_weights_fail_before_step_0(pixel_shards, reference_npz, tmp_path):
    cfg = _recipe(pixel_shards, reference_npz, inception_weights=str(tmp_path / "no.pth"))
    with pytest.raises(Exception, match="no.pth"):
        train(cfg, tmp_path / "run")
    assert not list_checkpoints(tmp_path / "run")


@pytest.mark.slow
def test_two_process_torchrun_matches_the_offline_evaluation(
    pixel_shards, reference_npz, inception_weights, tmp_path, torchrun_cli
):
    """torchrun with 2 CPU ranks: each samples half, the features are gathered in index order,
    and the logged metrics are those of ``gmflow evaluate`` on the saved checkpoint (real
    torch-fidelity Inception, random weights)."""
    cfg = _recipe(
        pixel_shards, reference_npz, num_samples=6, batch_size=2,
        inception_weights=str(inception_weights),
    )  # fmt: skip
    cfg = replace(cfg, train=replace(cfg.train, batch_size_per_device=4))
    recipe = tmp_path / "recipe.yaml"
    dump_recipe(cfg, recipe)
    torchrun_cli("train", str(recipe), "--out-dir", str(tmp_path / "run"))
    (row,) = _eval_rows(tmp_path / "run")
    offline = evaluate(
        EvalConfig(
            run=tmp_path / "run", step=3, vae="none", device="cpu",
            reference=str(reference_npz), out_dir=tmp_path / "eval", solvers=("gm-ode2",),
            steps=(2,), num_substeps=2, guidance_scales=(0.2,), num_samples=6, batch_size=3,
            shard_size=6, seed=0, inception_weights=inception_weights, feature_batch_size=6,
        )
    ).rows[0]  # fmt: skip
    for key in ("fid", "is", "precision", "recall"):
        # another process and batch split: BLAS may reassociate sums in the last bits
        assert row[f"eval/{key}"] == pytest.approx(offline[key], rel=1e-5, abs=1e-7), key
