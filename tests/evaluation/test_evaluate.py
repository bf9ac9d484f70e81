"""gmflow.evaluation.evaluate: seeds, batch size, resuming, references, errors, torchrun."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gmflow.config import load_recipe
from gmflow.errors import CheckpointError, ConfigError, DataError
from gmflow.evaluation import EvalConfig, evaluate
from gmflow.evaluation.config import EVAL_SOLVERS
from gmflow.evaluation.reference import load_reference
from gmflow.evaluation.samples import images_to_uint8, read_point, sample_inputs

REPO = Path(__file__).resolve().parents[2]


def _cfg(pipeline: Path, reference: Path, out_dir: Path, **kwargs) -> EvalConfig:  # type: ignore[no-untyped-def]
    # cheap solvers: on the shared 2-core CI machine every torch op costs ~10 ms, so the GM solvers
    # (hundreds of ops per step) are exercised by the slow tests and tests/flow
    base = dict(
        solvers=("euler",), steps=(1,), guidance_scales=(0.0, 0.4),
        num_samples=8, batch_size=3, shard_size=4, device="cpu",
    )  # fmt: skip
    return EvalConfig(
        pretrained=str(pipeline), reference=str(reference), out_dir=out_dir, **{**base, **kwargs}
    )


def _images(out_dir: Path, point: str, n: int, shard_size: int) -> np.ndarray:
    return np.concatenate([im for im, _ in read_point(out_dir / "points" / point, n, shard_size)])


# ---- seeds, pixels, config ----------------------------------------------------------------


def test_sample_inputs_follow_the_spec_seeds_for_any_split():
    labels, noise = sample_inputs(range(3, 7), 0, 1000, (4, 2, 2))
    for k, i in enumerate(range(3, 7)):  # spec 11.2 [LL]: label seed i, noise seed i + 1000
        assert labels[k] == torch.randint(0, 1000, (1,), generator=torch.Generator().manual_seed(i))
        expected = torch.randn((4, 2, 2), generator=torch.Generator().manual_seed(i + 1000))
        torch.testing.assert_close(noise[k], expected, rtol=0, atol=0)
    l2, n2 = sample_inputs(range(5, 7), 0, 1000, (4, 2, 2))
    torch.testing.assert_close(n2, noise[2:], rtol=0, atol=0)
    assert torch.equal(l2, labels[2:])
    _, other = sample_inputs(range(3, 7), 1, 1000, (4, 2, 2))
    assert not torch.allclose(other, noise)


def test_images_to_uint8_rounds_255x_half_up_and_clamps():
    k = torch.arange(256, dtype=torch.float64)
    x = torch.cat(
        [k / 255, (k[:-1] + 0.49) / 255, (k[:-1] + 0.51) / 255, torch.tensor([-0.1, 1.2])]
    )
    out = images_to_uint8(x.view(1, 1, 1, -1)).astype(int)  # grey -> RGB
    assert out.shape == (1, 1, x.numel(), 3) and (out[..., 0] == out[..., 2]).all()
    expected = np.concatenate([np.arange(256), np.arange(255), np.arange(1, 256), [0, 255]])
    np.testing.assert_array_equal(out[0, 0, :, 0], expected)


def test_paper_recipe_is_the_protocol_of_spec_11_2():
    cfg = load_recipe(REPO / "recipes" / "eval_imagenet256_fid50k.yaml", EvalConfig)
    scales = [0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.11, 0.13, 0.16, 0.19, 0.23, 0.27,
              0.33, 0.39, 0.47, 0.55, 0.65, 0.75]  # fmt: skip
    assert list(cfg.guidance_scales) == scales
    settings = {(p.solver, p.num_steps, p.num_substeps) for p in cfg.points()}
    assert settings == {
        ("gm-ode2", 8, 16),
        ("gm-ode2", 32, 4),
        ("gm-sde2", 8, 1),
        ("gm-sde2", 32, 1),
    }
    assert len(cfg.points()) == 80 and cfg.num_samples == 50_000 and cfg.batch_size == 125
    assert (cfg.seed, cfg.orthogonal, cfg.prc_neighborhood) == (0, 1.0, 3)
    assert cfg.guidance_mode == "probabilistic"


def test_eval_solvers_are_the_sampling_solvers():
    from gmflow.sampling import SOLVERS

    assert EVAL_SOLVERS == SOLVERS


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guidance_scales": (0.1, 1.2)}, r"outside \[0, 1\)"),
        ({"solvers": ("gm-ode3",)}, "unknown solvers"),
        ({"steps": (8, 8)}, "repeated"),
        ({"guidance_scales": ()}, "empty"),
        ({"num_samples": 3, "prc_neighborhood": 3}, "more than k samples"),
        ({"use_kid": True, "kid_subset_size": 100}, "kid_subset_size"),
        ({"reference": ""}, "no reference set"),
        ({"device": "tpu"}, "device"),
        ({"seed": 430}, "beyond 2\\^32"),
        ({"guidance_scales": (0.1, 1.2)}, "for CFG set guidance_mode cfg"),
        ({"guidance_mode": "cfg"}, r"are below 1: with guidance_mode cfg"),  # the paper's w
        (
            {"guidance_mode": "cfg", "guidance_scales": (1.5,), "orthogonal_guidance": 2.0},
            r"orthogonal_guidance must lie in \[0, 1\], got 2.0",
        ),  # fmt: skip
        ({"guidance_mode": "cf"}, "guidance_mode 'cf'; expected one of"),
        ({"guidance_interval": (0.9, 0.1)}, r"guidance_interval \[0.9, 0.1\] must be two"),
    ],
)
def test_config_errors(kwargs, match, tmp_path):
    args = {"pretrained": "p", "reference": "r.npz", "num_samples": 12, **kwargs}
    with pytest.raises(ConfigError, match=match):
        EvalConfig(**args)
    assert EvalConfig(pretrained="p", reference="r.npz", seed=428)  # the largest seed for 50k
    with pytest.raises(ConfigError, match="exactly one model"):
        EvalConfig(reference="r.npz", pretrained="a", run=tmp_path)


# ---- sweeps -------------------------------------------------------------------------------


def test_sweep_results_rows_summary_and_files(tiny_pipeline, reference_npz, tmp_path, stub):
    cfg = _cfg(tiny_pipeline, reference_npz, tmp_path / "out", solvers=("euler", "ddpm"))
    result = evaluate(cfg, extractor=stub)
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    ]
    assert rows == list(result.rows) and len(rows) == 4
    assert [(r["solver"], r["guidance_scale"]) for r in rows] == [
        ("euler", 0.0), ("euler", 0.4), ("ddpm", 0.0), ("ddpm", 0.4)
    ]  # fmt: skip
    for r in rows:
        assert set(r) >= {"fid", "is", "precision", "recall", "versions", "feature_extractor"}
        assert r["feature_extractor"] == stub.extractor_id and r["reference_images"] == 24
        assert set(r["versions"]) >= {"torch", "torch_fidelity", "gmflow"}
    for s in result.summary:  # best FID is the minimum, best precision the maximum of its group
        group = [r for r in rows if r["solver"] == s.solver]
        assert s.best_fid == min(r["fid"] for r in group)
        assert s.best_precision == max(r["precision"] for r in group)
    for key in ("fid_plot", "precision_plot", "pr_plot", "summary_md"):
        assert result.paths[key].is_file()
    # an ADM-style .npz of each best point holds exactly the shard images and labels
    npz_keys = [k for k in result.paths if k.startswith("npz_")]
    assert npz_keys
    point = npz_keys[0][4:]
    with np.load(result.paths[npz_keys[0]]) as f:
        np.testing.assert_array_equal(f["arr_0"], _images(cfg.out_dir, point, 8, 4))
        assert f["arr_0"].dtype == np.uint8 and f["arr_1"].shape == (8,)
    # the metrics of a row are those of the stored images against the reference
    from gmflow.evaluation.fid import compute_metrics, extract_features

    ref = load_reference(reference_npz, stub, tmp_path / "cache")
    feats = extract_features([_images(cfg.out_dir, rows[1]["point"], 8, 4)], stub)
    again = compute_metrics(feats, ref.stats, ref.pool)
    assert again == pytest.approx({k: rows[1][k] for k in again}, rel=1e-9)


def test_deterministic_samples_do_not_depend_on_batch_size(
    tiny_pipeline, reference_npz, tmp_path, stub
):
    a = evaluate(_cfg(tiny_pipeline, reference_npz, tmp_path / "a", batch_size=3), extractor=stub)
    b = evaluate(_cfg(tiny_pipeline, reference_npz, tmp_path / "b", batch_size=8), extractor=stub)
    for ra, rb in zip(a.rows, b.rows, strict=True):
        ia, ib = (_images(tmp_path / d, ra["point"], 8, 4).astype(int) for d in "ab")
        assert np.abs(ia - ib).max() <= 1 and (ia == ib).mean() > 0.99  # rare ±1 from matmul order
        assert ra["fid"] == pytest.approx(rb["fid"], rel=1e-3)


def test_stochastic_samples_do_not_depend_on_batch_size(
    tiny_pipeline, reference_npz, tmp_path, stub
):
    kw = dict(solvers=("ddpm",), steps=(2,), guidance_scales=(0.4,))
    a = evaluate(
        _cfg(tiny_pipeline, reference_npz, tmp_path / "a", batch_size=3, **kw), extractor=stub
    )
    b = evaluate(
        _cfg(tiny_pipeline, reference_npz, tmp_path / "b", batch_size=8, **kw), extractor=stub
    )
    ia, ib = (_images(tmp_path / d, a.rows[0]["point"], 8, 4).astype(int) for d in "ab")
    assert np.abs(ia - ib).max() <= 1 and (ia == ib).mean() > 0.99  # rare ±1 from matmul order
    assert a.rows[0]["fid"] == pytest.approx(b.rows[0]["fid"], rel=1e-3)


def test_stochastic_samples_are_reproducible_and_seeded(
    tiny_pipeline, reference_npz, tmp_path, stub
):
    kw = dict(solvers=("ddpm",), steps=(2,), guidance_scales=(0.4,))
    runs = [
        evaluate(_cfg(tiny_pipeline, reference_npz, tmp_path / d, seed=s, **kw), extractor=stub)
        for d, s in (("a", 0), ("b", 0), ("c", 1))
    ]
    pid = runs[0].rows[0]["point"]
    a, b, c = (_images(tmp_path / d, pid, 8, 4) for d in "abc")
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5


def test_interrupted_sweep_resumes_without_recomputation(
    tiny_pipeline, reference_npz, tmp_path, stub
):
    cfg = _cfg(tiny_pipeline, reference_npz, tmp_path / "run")

    class Stop(Exception):
        pass

    def stop_in_second_point(stage: str, done: int, total: int) -> None:
        if stage.startswith("euler_n001_s01_w0.4000: sampling") and done >= 5:
            raise Stop  # inside the second shard of the second point: it is left unwritten

    with pytest.raises(Stop):
        evaluate(cfg, extractor=stub, progress=stop_in_second_point)
    points = tmp_path / "run" / "points"
    first, second = sorted(points.iterdir())
    assert (first / "metrics.json").is_file() and not (second / "metrics.json").exists()
    assert sorted(p.name for p in second.glob("shard-*")) == ["shard-000000.tar"]
    (second / "shard-000001.tar.tmp").write_bytes(b"garbage of a killed writer")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in points.rglob("shard-*.tar")}
    resumed = evaluate(cfg, extractor=stub)
    assert (resumed.shards_written, resumed.shards_skipped) == (1, 1)  # only the missing shard
    for p, (mtime, data) in before.items():
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    fresh = evaluate(replace(cfg, out_dir=tmp_path / "fresh"), extractor=stub)
    for r, f in zip(resumed.rows, fresh.rows, strict=True):
        assert {k: r[k] for k in ("fid", "is", "precision", "recall")} == {
            k: f[k] for k in ("fid", "is", "precision", "recall")
        }
    again = evaluate(cfg, extractor=stub)  # everything done: nothing is sampled again
    assert (again.shards_written, again.shards_skipped) == (0, 0) and again.rows == resumed.rows


def test_an_out_dir_of_other_settings_is_refused(tiny_pipeline, reference_npz, tmp_path, stub):
    cfg = _cfg(tiny_pipeline, reference_npz, tmp_path / "run", guidance_scales=(0.0,))
    evaluate(cfg, extractor=stub)
    with pytest.raises(ConfigError, match="num_samples: 8 there, 16 now"):
        evaluate(replace(cfg, num_samples=16), extractor=stub)
    extended = evaluate(
        replace(cfg, guidance_scales=(0.0, 0.4)), extractor=stub
    )  # new points: fine
    assert (extended.shards_written, len(extended.rows)) == (2, 2)


def test_a_cfg_sweep_is_vanilla_cfg_and_its_own_points(tiny_pipeline, reference_npz, tmp_path,
                                                       stub):  # fmt: skip
    """guidance_mode cfg: Table 4's CFG ablation; its points and settings differ from w's."""
    from gmflow.evaluation.config import sweep_points
    from gmflow.evaluation.samples import sample_batch
    from gmflow.model_loading import load_model
    from gmflow.sampling import SampleConfig

    cfg = _cfg(tiny_pipeline, reference_npz, tmp_path / "cfg", guidance_mode="cfg",
               guidance_scales=(1.0, 3.0))  # fmt: skip
    assert [p.id for p in cfg.points()] == ["euler_n001_s01_w1.0000_cfg",
                                            "euler_n001_s01_w3.0000_cfg"]  # fmt: skip
    assert cfg.orthogonal == 0.0 and cfg.sample_settings()["guidance_mode"] == "cfg"
    assert "guidance_mode" not in _cfg(tiny_pipeline, reference_npz, tmp_path).sample_settings()
    rows = evaluate(cfg, extractor=stub).rows
    assert [(r["guidance_mode"], r["guidance_scale"], r["orthogonal_guidance"]) for r in rows] == [
        ("cfg", 1.0, 0.0), ("cfg", 3.0, 0.0)
    ]  # fmt: skip
    # the images are vanilla CFG's: g = 1 equals w = 0, g = 3 differs
    model = load_model(SampleConfig(out_dir=tmp_path, pretrained=str(tiny_pipeline),
                                    class_ids=(1,), device="cpu"))  # fmt: skip
    g1, g3 = (_images(cfg.out_dir, p.id, 8, 4) for p in sweep_points(cfg))
    (w0,) = [p for p in sweep_points(replace(cfg, guidance_mode="probabilistic",
                                             guidance_scales=(0.0,)))]  # fmt: skip
    np.testing.assert_array_equal(g1, sample_batch(model, w0, range(8), 0).images)
    assert not np.array_equal(g1, g3)


def test_a_guidance_interval_reaches_the_samples(tiny_pipeline, reference_npz, tmp_path, stub):
    from gmflow.evaluation.samples import sample_batch
    from gmflow.model_loading import load_model
    from gmflow.sampling import SampleConfig

    cfg = _cfg(tiny_pipeline, reference_npz, tmp_path / "gi", steps=(2,), guidance_scales=(0.4,),
               guidance_interval=(0.6, 1.0))  # fmt: skip
    assert cfg.sample_settings()["guidance_interval"] == [0.6, 1.0]
    (row,) = evaluate(cfg, extractor=stub).rows
    assert row["guidance_interval"] == [0.6, 1.0]
    (point,) = cfg.points()
    model = load_model(SampleConfig(out_dir=tmp_path, pretrained=str(tiny_pipeline),
                                    class_ids=(1,), device="cpu"))  # fmt: skip
    images = _images(cfg.out_dir, point.id, 8, 4)
    inside = sample_batch(model, point, range(8), 0, guidance_interval=(0.6, 1.0)).images
    everywhere = sample_batch(model, point, range(8), 0).images
    np.testing.assert_array_equal(images, inside)
    assert not np.array_equal(images, everywhere)  # the second step (σ = 0.5) is unguided


def test_missing_inception_weights_fail_before_sampling(
    tiny_pipeline, reference_npz, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="weights-inception-2015-12-05-6726825d.pth"):
        evaluate(_cfg(tiny_pipeline, reference_npz, tmp_path / "out"))
    assert not (tmp_path / "out" / "points").exists()


def test_reference_errors(tmp_path, stub):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    for ref, match in (
        (tmp_path / "bad.npz", "expected images 'arr_0'"),
        (tmp_path / "nope", "does not exist"),
    ):
        with pytest.raises(DataError, match=match):
            load_reference(ref, stub, tmp_path / "cache")


# ---- references -----------------------------------------------------------------------------


def test_reference_kinds_agree_and_are_cached(reference_npz, tmp_path, stub):
    from PIL import Image

    images = np.load(reference_npz)["arr_0"]
    folder = tmp_path / "folder"
    for i, im in enumerate(images):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"c{i % 2}" / f"{i:03d}.png")
    order = sorted(range(len(images)), key=lambda i: (i % 2, i))  # sorted by path
    shards = _pixel_shards(tmp_path / "shards", images)
    npz = load_reference(reference_npz, stub, tmp_path / "cache")
    assert npz.kind == "npz-images" and npz.num_images == 24
    calls = stub.calls
    cached = load_reference(reference_npz, stub, tmp_path / "cache")
    assert stub.calls == calls and cached.fingerprint == npz.fingerprint  # read from the cache
    np.testing.assert_array_equal(cached.pool, npz.pool)
    from_folder = load_reference(folder, stub, tmp_path / "cache")
    np.testing.assert_allclose(from_folder.pool, npz.pool[order], rtol=0, atol=0)
    from_shards = load_reference(shards, stub, tmp_path / "cache")
    assert from_shards.kind == "shards-pixel"
    np.testing.assert_allclose(from_shards.pool, npz.pool, rtol=0, atol=0)
    assert len({npz.fingerprint, from_folder.fingerprint, from_shards.fingerprint}) == 3
    np.savez(tmp_path / "stats.npz", mu=npz.stats.mu, sigma=npz.stats.sigma)
    stats_only = load_reference(tmp_path / "stats.npz", stub, tmp_path / "cache")
    assert stats_only.pool is None and stats_only.kind == "npz-stats"
    np.testing.assert_array_equal(stats_only.stats.sigma, npz.stats.sigma)


def _pixel_shards(root: Path, images: np.ndarray, mode: str = "pixel", arrays=None) -> Path:  # type: ignore[no-untyped-def]
    from gmflow.data.manifest import Manifest, ShardInfo
    from gmflow.data.shard_io import ShardSample, ShardWriter

    (root / "shards").mkdir(parents=True)
    writer = ShardWriter(root / "shards" / "train-000000.tar")
    for i in range(len(images)):
        data = {"pixels": images[i]} if arrays is None else {k: v[i] for k, v in arrays.items()}
        writer.write(ShardSample(f"{i:09d}", 0, f"{i}.png", data))
    sha, size = writer.commit()
    manifest = Manifest(
        mode=mode, num_samples=len(images),
        shards=(ShardInfo("shards/train-000000.tar", len(images), size, sha),),
        classes={0: "a"}, resolution=images.shape[1], sample_shape=(3, 8, 8), stored_dtype="uint8",
        encoder=None if mode == "pixel" else str(root / "vae"), scaling_factor=1.0,
        channel_mean=(0.0,) * 3, channel_std=(1.0,) * 3,
    )  # fmt: skip
    (root / "manifest.json").write_text(manifest.to_json())
    return root


def test_latent_shards_are_decoded_from_the_posterior_mean(tmp_path, stub):
    from diffusers import AutoencoderKL

    from gmflow.models.vae import load_vae

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4
    ).save_pretrained(tmp_path / "shards" / "vae")
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 2, 4, 8, 8)).astype(np.float16)  # (N, [image, flip], C, h, w)
    std = np.full_like(mean, 0.1)
    root = _pixel_shards(
        tmp_path / "shards", np.zeros((3, 8, 8, 3)), "latent", {"mean": mean, "std": std}
    )
    ref = load_reference(root, stub, tmp_path / "cache")
    vae = load_vae(root / "vae")
    z = torch.from_numpy(mean[:, 0].astype(np.float32))
    expected = images_to_uint8(vae.model.decode(z).sample.div(2).add(0.5).clamp(0, 1))
    assert ref.kind == "shards-latent"
    np.testing.assert_array_equal(
        ref.pool, stub(torch.from_numpy(expected).permute(0, 3, 1, 2))[0].numpy()
    )


# ---- real Inception, torchrun ---------------------------------------------------------------


@pytest.mark.slow
def test_two_scale_sweep_of_64_samples_with_random_inception(
    tiny_pipeline, reference_npz, tmp_path, inception_weights
):
    cfg = _cfg(
        tiny_pipeline, reference_npz, tmp_path / "out", solvers=("gm-ode2",), steps=(2,),
        num_samples=64, batch_size=32,
        shard_size=32, guidance_scales=(0.05, 0.45), inception_weights=inception_weights,
        feature_batch_size=64,
    )  # fmt: skip
    result = evaluate(cfg)
    assert len(result.rows) == 2
    for r in result.rows:
        assert r["feature_extractor"].startswith("inception-v3-compat/sha256:")
        assert r["fid"] > 0 and r["is"] >= 1 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert list((tmp_path / "out" / "reference").glob("reference-*.npz"))
    assert "best FID" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.slow
def test_two_process_torchrun_gives_the_same_samples_and_metrics(
    tiny_pipeline, reference_npz, tmp_path, inception_weights, torchrun_cli
):
    args = [
        "--pretrained", str(tiny_pipeline), "--reference", str(reference_npz),
        "--solvers", "gm-sde2", "--steps", "2", "--guidance-sweep", "0.3",
        "--num-samples", "8", "--batch-size", "2", "--set", "shard_size=2",
        "--inception-weights", str(inception_weights), "--device", "cpu",
    ]  # fmt: skip
    torchrun_cli("evaluate", *args, "--out-dir", str(tmp_path / "two"))
    from gmflow_cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *args, "--out-dir", str(tmp_path / "one")])
    assert exit_info.value.code in (0, None)
    two, one = (json.loads((tmp_path / d / "results.jsonl").read_text()) for d in ("two", "one"))
    pid = one["point"]
    np.testing.assert_array_equal(
        _images(tmp_path / "two", pid, 8, 2), _images(tmp_path / "one", pid, 8, 2)
    )
    for key in ("fid", "is", "precision", "recall"):
        # samples are byte-identical (above); the metrics run in another process whose BLAS
        # thread split may reassociate sums (seen: 1.6e-9 relative on FID)
        assert two[key] == pytest.approx(one[key], rel=1e-6)
