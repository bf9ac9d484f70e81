"""``gmflow evaluate`` on CPU: sampling and Inception throughput, and where a sweep's time goes.

Three measurements in one process (so their ratios stay meaningful on a shared machine):

1. sampling throughput (images/s) of a tiny latent GM-DiT pipeline (K = 2, one block, 4x8x8
   latents, a tiny AutoencoderKL decoding to 16x16) for gm-ode2 and gm-sde2 at N = 8, guided;
2. feature throughput (images/s) of torch-fidelity's Inception-v3 (random weights: the cost is
   that of the real network, 299 x 299 after its own resize);
3. one whole ``gmflow.evaluation.evaluate`` call (1 solver x 2 guidance scales) with its wall
   time split into sampling, decoding, reference features, sample features and metrics.

    python benchmarks/evaluation.py                 # defaults: 32 samples per point, batch 16
    python benchmarks/evaluation.py --num-samples 64 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def tiny_latent_pipeline(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    from gmflow.pipelines import (
        FlowEulerODEScheduler,
        GMDiTPipeline,
        GMDiTTransformer2DModel,
        SpectrumMLPModel,
    )

    torch.manual_seed(0)
    transformer = GMDiTTransformer2DModel(
        num_gaussians=2, logstd_inner_dim=8, num_attention_heads=2, attention_head_dim=8,
        in_channels=4, num_layers=1, sample_size=8, num_embeds_ada_norm=10,
    )  # fmt: skip
    spectrum = SpectrumMLPModel(base_size=(4, 8, 8), layers=(8,))
    for p in [*transformer.parameters(), *spectrum.parameters()]:
        p.data.normal_(0, 0.05)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
    )  # fmt: skip
    GMDiTPipeline(
        transformer=transformer, scheduler=FlowEulerODEScheduler(), spectrum_net=spectrum, vae=vae
    ).save_pretrained(folder)
    return folder


def sampling_throughput(pipeline: Path, solver: str, n: int, batch: int) -> float:
    from gmflow.evaluation.config import SweepPoint, substeps_for
    from gmflow.evaluation.samples import SamplingStats, generate_point
    from gmflow.model_loading import load_model
    from gmflow.sampling import SampleConfig

    model = load_model(SampleConfig(out_dir=pipeline, pretrained=str(pipeline), class_ids=(0,)))
    point = SweepPoint(solver, 8, substeps_for(solver, 8, None), 0.3)
    with tempfile.TemporaryDirectory() as tmp:
        stats: SamplingStats = generate_point(
            model, point, Path(tmp), num_samples=n, shard_size=n, batch_size=batch, seed=0
        )
    return n / (stats.sampling_s + stats.decoding_s)


def feature_throughput(weights: Path, n: int, batch: int) -> float:
    from gmflow.evaluation.fid import InceptionFeatures, extract_features

    extractor = InceptionFeatures(weights)
    images = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    extract_features([images[:2]], extractor)  # warm-up
    t0 = time.perf_counter()
    extract_features([images], extractor, batch)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=32, help="samples per sweep point")
    parser.add_argument("--reference-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gmflow.evaluation import EvalConfig, evaluate
    from gmflow.evaluation.fid import write_random_inception_weights

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipeline = tiny_latent_pipeline(root / "pipeline")
        weights = write_random_inception_weights(root / "inception.pth")
        ref = root / "ref.npz"
        rng = np.random.default_rng(1)
        np.savez(ref, arr_0=rng.integers(0, 256, (args.reference_size, 16, 16, 3), np.uint8))

        print(f"{'measurement':<44} {'images/s':>9}")
        rates = {}
        for solver in ("gm-ode2", "gm-sde2"):
            rates[solver] = sampling_throughput(pipeline, solver, args.num_samples, args.batch_size)
            label = f"sampling+decoding {solver} N=8 w=0.3 (tiny model)"
            print(f"{label:<44} {rates[solver]:>9.2f}")
        rates["inception"] = feature_throughput(weights, 16, args.batch_size)
        print(f"{'Inception-v3 features (16x16 -> 299x299)':<44} {rates['inception']:>9.2f}")
        print(f"ratio sampling gm-ode2 / features: {rates['gm-ode2'] / rates['inception']:.1f}x")

        cfg = EvalConfig(
            pretrained=str(pipeline), reference=str(ref), out_dir=root / "eval",
            solvers=("gm-ode2",), steps=(8,), guidance_scales=(0.05, 0.45),
            num_samples=args.num_samples, batch_size=args.batch_size,
            shard_size=args.num_samples, inception_weights=weights, device="cpu",
            feature_batch_size=args.batch_size,
        )  # fmt: skip
        t0 = time.perf_counter()
        result = evaluate(cfg)
        wall = time.perf_counter() - t0
        t = result.timings
        parts = [
            ("sampling (network + solver)", t["sampling"]),
            ("decoding (VAE + uint8)", t["decoding"]),
            ("reference features", t["reference"]),
            ("sample features (Inception)", t["features"]),
            ("metrics (FID, IS, P/R)", t["metrics"]),
            ("shard writing", t["writing"]),
        ]
        parts.append(("rest (loading, report, plots)", wall - sum(v for _, v in parts)))
        print(f"\nwhole evaluate(): 2 points x {args.num_samples} samples, reference "
              f"{args.reference_size} images: {wall:.1f} s")  # fmt: skip
        print(f"{'part':<34} {'s':>8} {'share':>7}")
        for name, seconds in parts:
            print(f"{name:<34} {seconds:>8.2f} {seconds / wall:>7.1%}")


if __name__ == "__main__":
    main()
