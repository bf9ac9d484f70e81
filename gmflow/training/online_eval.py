"""FID / IS / precision / recall of the EMA model during training (``online_eval`` of a recipe).

:func:`prepare_online_eval` runs before step 0 on every rank: it checks the settings, the
reference set and the Inception weights (rank 0, shared with the others), computes the reference
features once (cached under ``RUN/online_eval/reference``) and loads the decoder of latent
models. The returned :class:`OnlineEvaluator` is then called by every rank at the same steps:

1. a copy of the model with the EMA weights samples this rank's contiguous share of
   ``num_samples`` indices with :func:`gmflow.evaluation.samples.sample_batch`, the routine of
   ``gmflow evaluate`` (the same seeds, so the same images);
2. each rank extracts the Inception features of its images;
3. the features are gathered to rank 0 in index order (padded ``torch.distributed.gather``, so
   the IS splits are those of the offline evaluation), which computes the metrics.

The training RNG streams are left as they were (``fork_rng``): a run gives the same weights with
or without online evaluation.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gmflow.errors import ConfigError
from gmflow.run_config import RunConfig
from gmflow.training.distributed import DistInfo, barrier, on_main

__all__ = ["OnlineEvaluator", "prepare_online_eval"]

logger = logging.getLogger(__name__)


def _share(num_samples: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous block of sample indices (sizes differ by at most one)."""
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


class OnlineEvaluator:
    """Evaluates the EMA model of a run; call it on every rank at the same step."""

    def __init__(
        self, cfg: RunConfig, dist: DistInfo, extractor: Any, reference: Any, vae: Any
    ) -> None:
        from gmflow.evaluation.config import SweepPoint, substeps_for

        e = cfg.online_eval
        self.cfg = cfg
        self.dist = dist
        self.extractor = extractor
        self.reference = reference  # gmflow.evaluation.reference.Reference on rank 0, else None
        self.vae = vae
        self.point = SweepPoint(
            e.solver, e.num_steps, substeps_for(e.solver, e.num_steps, e.num_substeps),
            e.guidance_scale,
        )  # fmt: skip

    def _model(self, objective: nn.Module, ema: Any) -> Any:
        from gmflow.model_loading import LoadedModel

        model = copy.deepcopy(objective).eval()
        if ema is not None:
            ema.load_into(model)
        dtype = torch.bfloat16 if self.cfg.online_eval.dtype == "bf16" else torch.float32
        m = self.cfg.model
        return LoadedModel(
            denoiser=model.denoiser.to(dtype),
            spectrum_net=None if model.spectrum_net is None else model.spectrum_net.to(dtype),
            vae=self.vae,
            num_classes=m.num_classes,
            in_channels=m.in_channels,
            sample_size=m.sample_size,
            shift=float(self.cfg.loss.shift),
            labels=None,
            source="training",
        )

    @torch.no_grad()
    def __call__(self, objective: nn.Module, ema: Any, step: int) -> dict[str, float] | None:
        """Sample, extract and gather; returns the ``eval/...`` metrics on rank 0, else None."""
        from gmflow.evaluation.fid import compute_metrics, extract_features
        from gmflow.evaluation.samples import sample_batch

        e, dist = self.cfg.online_eval, self.dist
        t0 = time.perf_counter()
        if dist.is_main:
            logger.info(
                "step %d: online evaluation, %d samples of %s over %d process(es)",
                step, e.num_samples, self.point.id, dist.world_size,
            )  # fmt: skip
        devices = [dist.device] if dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            share = _share(e.num_samples, dist.rank, dist.world_size)

            def images(model: Any) -> Any:
                next_report = 0.1
                for first in range(share.start, share.stop, e.batch_size):
                    index = range(first, min(first + e.batch_size, share.stop))
                    batch = sample_batch(model, self.point, index, e.seed, e.orthogonal_guidance)
                    yield batch.images
                    done = (index.stop - share.start) / max(len(share), 1)
                    if dist.is_main and done >= next_report and done < 1:
                        # rank 0's share stands for all ranks: they run the same batches
                        elapsed = time.perf_counter() - t0
                        logger.info(
                            "step %d: online evaluation %d%% (%d/%d samples on rank 0, "
                            "%.1f s, about %.0f s left)",
                            step, int(100 * done), index.stop - share.start, len(share),
                            elapsed, elapsed * (1 - done) / done,
                        )  # fmt: skip
                        next_report = math.floor(done * 10 + 1) / 10

            model = self._model(objective, ema)
            mine = extract_features(images(model), self.extractor, e.feature_batch_size)
            del model  # the EMA copy: free its memory before training resumes
        features = self._gather(mine)
        result = None
        if dist.is_main:
            assert features is not None and self.reference is not None
            pool = self.reference.pool if e.precision_recall else None
            metrics = compute_metrics(features, self.reference.stats, pool, device=str(dist.device))
            result = {f"eval/{k}": v for k, v in metrics.items() if not k.endswith("_std")}
            result["eval/seconds"] = time.perf_counter() - t0
            logger.info(
                "step %d: online %s %s", step, self.point.id,
                ", ".join(f"{k[5:]} {v:.4g}" for k, v in result.items()),
            )  # fmt: skip
        barrier()
        return result

    def _gather(self, mine: Any) -> Any:
        """All ranks' features on rank 0, in sample-index order (None elsewhere)."""
        from gmflow.evaluation.fid import Features

        dist = self.dist
        if not dist.distributed:
            return mine
        n, w = self.cfg.online_eval.num_samples, dist.world_size
        rows = max(len(_share(n, r, w)) for r in range(w))
        width = mine.pool.shape[1] + mine.logits.shape[1]
        # nccl gathers CUDA tensors, gloo CPU ones
        comm = dist.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        local = torch.zeros(rows, width, dtype=torch.float32, device=comm)
        local[: len(mine.pool)] = torch.from_numpy(
            np.concatenate([mine.pool, mine.logits], axis=1)
        ).to(comm)
        gathered = [torch.empty_like(local) for _ in range(w)] if dist.is_main else None
        torch.distributed.gather(local, gathered, dst=0)
        if not dist.is_main:
            return None
        assert gathered is not None
        parts = [g[: len(_share(n, r, w))].cpu().numpy() for r, g in enumerate(gathered)]
        both = np.concatenate(parts)
        d = mine.pool.shape[1]
        return Features(pool=both[:, :d], logits=both[:, d:])


def prepare_online_eval(
    cfg: RunConfig, run_dir: Path, dist: DistInfo, *, extractor: Any = None
) -> OnlineEvaluator | None:
    """Check and set up in-training evaluation before step 0; None when ``online_eval.every`` is 0.

    Args:
        cfg: the run's recipe.
        run_dir: the run folder (the reference features are cached in ``online_eval/``).
        dist: this process's place in the job.
        extractor: a :class:`gmflow.evaluation.fid.FeatureExtractor` instead of torch-fidelity's
            Inception (tests); then no Inception weights are needed.

    Raises:
        ConfigError: a model whose samples are not images and no VAE to decode them.
        CheckpointError: missing Inception weights, or a latent dataset's VAE that cannot load.
        DataError: an unusable reference set.
    """
    e = cfg.online_eval
    if not e.every:
        return None
    from gmflow.evaluation.fid import InceptionFeatures, resolve_inception_weights
    from gmflow.evaluation.reference import load_reference, reference_kind
    from gmflow.training.validation import load_dataset_vae

    assert e.reference is not None  # OnlineEvalConfig checks it
    reference_path = e.reference
    if e.num_samples < dist.world_size:
        raise ConfigError(
            f"online_eval.num_samples={e.num_samples} is fewer than the {dist.world_size} "
            "processes that share the sampling; raise it"
        )

    def weights() -> str | None:
        reference_kind(reference_path)
        if extractor is not None:
            return None
        return str(resolve_inception_weights(e.inception_weights))

    weights_path = on_main(dist, weights)
    with torch.random.fork_rng(devices=[dist.device] if dist.device.type == "cuda" else []):
        vae = load_dataset_vae(cfg, "online_eval.vae", dist.device, required=True)
    if vae is None and cfg.model.in_channels not in (1, 3):
        raise ConfigError(
            f"online_eval: the model draws {cfg.model.in_channels}-channel latents and no VAE "
            "decodes them to images; set online_eval.vae to the VAE of the dataset"
        )
    feats = extractor if extractor is not None else InceptionFeatures(weights_path, dist.device)
    state: dict[str, Any] = {}

    def reference() -> str:
        state["ref"] = load_reference(
            reference_path, feats, Path(run_dir) / "online_eval" / "reference",
            batch_size=e.feature_batch_size, device=str(dist.device),
        )  # fmt: skip
        if e.precision_recall and state["ref"].pool is None:
            raise ConfigError(
                f"online_eval.reference {reference_path} holds statistics only (mu, sigma), "
                "so precision and recall cannot be computed; set online_eval.precision_recall: "
                "false or use a reference with images"
            )
        return state["ref"].fingerprint

    on_main(dist, reference)
    return OnlineEvaluator(cfg, dist, feats, state.get("ref"), vae)
