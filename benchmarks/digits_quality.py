"""Digits quality bar (issue: trainer, section 3): a classifier fitted on the real digits judges
class-conditional samples of the tiny pixel-space GM-DiT trained by recipes/digits_gmdit_tiny.yaml.

    .venv/bin/python benchmarks/digits_quality.py --work-dir /tmp/digits [--max-steps N]

Steps: export the digits (16x16), cache them with ``gmflow cache-data --vae none``, train the
GMFlow recipe and a K = 1 flow-matching baseline (same trunk and budget, constant std), draw 50
samples per class with gm-sde2 and gm-ode2 (8 steps) at several guidance scales and with Euler on
the baseline, and print the accuracy of a scikit-learn classifier (an RBF SVM fitted on all 1,797
real digits in their original 8x8 feature space) per solver and guidance. Target: >= 90% for
gm-sde2 and gm-ode2 at guidance 0.3.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gmflow.config import load_recipe
from gmflow.data.cache import CacheConfig, cache_latents
from gmflow.data.digits import export_digits, load_digits_images, to_digit_features
from gmflow.flow import sample
from gmflow.run_config import RunConfig
from gmflow.training import train
from gmflow.training.build import load_run

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits_gmdit_tiny.yaml"


def classifier():
    from sklearn.svm import SVC

    images, labels = load_digits_images()
    return SVC(gamma=0.001, C=10.0).fit(images.reshape(len(images), 64), labels)


@torch.no_grad()
def accuracy(
    run_dir: Path, clf, solver: str, order: int, guidance: float, per_class: int = 50
) -> float:
    cfg, denoiser, spectrum_net = load_run(run_dir)
    m = cfg.model
    labels = torch.arange(m.num_classes).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(1234)
    noise = torch.randn(len(labels), m.in_channels, m.sample_size, m.sample_size, generator=gen)
    x = sample(
        denoiser,
        noise,
        solver=solver,
        num_steps=8,
        order=order,
        guidance_scale=guidance,
        num_substeps=16 if solver == "gm-ode" else None,
        class_labels=labels,
        null_class_id=m.num_classes,
        spectrum_net=spectrum_net if solver == "gm-sde" else None,
        generator=gen,
    )
    pred = clf.predict(to_digit_features(x.numpy()))
    return float((pred == labels.numpy()).mean())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/gmflow_digits"))
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 0.15, 0.3, 0.45])
    args = p.parse_args()
    torch.set_num_threads(2)
    work = args.work_dir
    if not (work / "cache" / "manifest.json").is_file():
        export_digits(work / "images")
        cache_latents(
            CacheConfig(
                source=work / "images",
                out_dir=work / "cache",
                vae="none",
                resolution=16,
                num_workers=0,
            )
        )
    overrides = [f"data.path={work / 'cache'}", "validation.every=0"]
    if args.max_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg = load_recipe(RECIPE, RunConfig, overrides)
    baseline = load_recipe(
        RECIPE,
        RunConfig,
        [
            *overrides,
            "model.num_gaussians=1",
            "model.constant_logstd=0.0",
            "model.use_spectrum_net=false",
        ],
    )
    timings = {}
    for name, c in (("gmflow", cfg), ("baseline_k1", baseline)):
        t0 = time.perf_counter()
        train(c, work / name)
        timings[name] = time.perf_counter() - t0
    clf = classifier()
    rows = []
    for g in args.guidance:
        for solver, order in (("gm-sde", 2), ("gm-ode", 2)):
            rows.append((f"{solver}2", g, accuracy(work / "gmflow", clf, solver, order, g)))
        rows.append(("euler (K=1 FM)", g, accuracy(work / "baseline_k1", clf, "euler", 1, g)))
    print(
        f"training: {cfg.train.max_steps} steps x batch {cfg.train.global_batch_size}; "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    )
    print(f"{'solver':<18}{'guidance':>10}{'accuracy':>10}")
    for solver, g, acc in rows:
        print(f"{solver:<18}{g:>10.2f}{acc:>10.3f}")
    (work / "digits_quality.json").write_text(
        json.dumps(
            {
                "train_seconds": timings,
                "rows": [{"solver": s, "guidance": g, "accuracy": a} for s, g, a in rows],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
