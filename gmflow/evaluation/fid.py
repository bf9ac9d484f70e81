"""Inception features and the ADM metrics (FID, IS, precision/recall, KID) via torch-fidelity.

The only module that imports ``torch_fidelity``. Features come from its ``inception-v3-compat``
extractor, the PyTorch port of the TensorFlow Inception-v3 (``inception-2015-12-05``) that the
ADM evaluator and StyleGAN2-ADA use (spec 11.3): it takes uint8 images (B, 3, H, W) of any size,
resizes them to 299 x 299 with TF1's bilinear rule and returns

* ``pool``: the 2048-d average-pooled features (FID, precision/recall, KID);
* ``logits``: the 1008 logits without the output bias, ``pool @ W_fc.T`` (IS).

Metrics, with X the generated and Y the reference features (``pool``):

* FID = ‖μ_X − μ_Y‖² + tr Σ_X + tr Σ_Y − 2 tr (Σ_X Σ_Y)^{1/2} (torch-fidelity takes the trace of
  the square root as Σ sqrt(eig(Σ_X Σ_Y)), real part);
* IS = exp E_x KL(p(y|x) ‖ p(y)) over ``min(10, N)`` splits of the shuffled logits (mean and std);
* precision = fraction of X within the k-NN radius (k = 3) of some point of Y, recall the same with
  X and Y swapped (Kynkäänniemi et al. 2019);
* KID (optional) = unbiased MMD² with the cubic kernel (x·y/D + 1)³ over 100 subsets.

Weights: torch-fidelity downloads ``weights-inception-2015-12-05-6726825d.pth`` into
``$TORCH_HOME/hub/checkpoints/`` (``torch.hub.get_dir()``); :func:`resolve_inception_weights`
finds it there or downloads it once, else raises a :class:`CheckpointError` naming the file, before
any sampling starts. Tests and benchmarks inject their own extractor (any object with
``extractor_id`` and ``__call__(uint8 images) -> (pool, logits)``) or random Inception weights
(:func:`write_random_inception_weights`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from gmflow.errors import CheckpointError

__all__ = [
    "INCEPTION_EXTRACTOR",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "FeatureExtractor",
    "InceptionFeatures",
    "Features",
    "FIDStats",
    "inception_cache_path",
    "resolve_inception_weights",
    "write_random_inception_weights",
    "extract_features",
    "fid_statistics",
    "compute_metrics",
    "torch_fidelity_version",
]

logger = logging.getLogger(__name__)

INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's file name (0.3, 0.4): the basename of its download URL."""
INCEPTION_WEIGHTS_ALIASES = ("pt_inception-2015-12-05-6726825d.pth",)
"""pytorch-fid's name for the same conversion (same parameter names); also looked up."""
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
POOL, LOGITS = "2048", "logits_unbiased"  # torch-fidelity's feature names
DOWNLOAD_TIMEOUT_S = 30


class FeatureExtractor(Protocol):
    """What the metrics need from a feature extractor (tests inject cheap ones)."""

    extractor_id: str  # recorded in results and part of the reference cache fingerprint

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 (B, 3, H, W) -> (pool (B, D), logits (B, L)) float."""
        ...


def torch_fidelity_version() -> str:
    import torch_fidelity

    return str(torch_fidelity.__version__)


def inception_cache_path() -> Path:
    """Where torch-fidelity keeps the downloaded weights: ``torch.hub.get_dir()/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "GMFLOW_OFFLINE"))


def _missing_weights(reason: str) -> CheckpointError:
    cache = inception_cache_path()
    return CheckpointError(
        f"the Inception-v3 weights of torch-fidelity are not available ({reason}). Provide the "
        f"file {INCEPTION_WEIGHTS_FILE} (pytorch-fid ships the same weights as "
        f"{INCEPTION_WEIGHTS_ALIASES[0]}): download {INCEPTION_WEIGHTS_URL} on a machine with "
        f"internet, then either copy it to torch-fidelity's cache {cache} or pass "
        f"--inception-weights PATH. Nothing was sampled."
    )


def resolve_inception_weights(path: str | Path | None, *, download: bool = True) -> Path:
    """A local file with the Inception weights; call it before sampling.

    Order: ``path`` when given; else torch-fidelity's cache (``inception_cache_path()``, or the
    pytorch-fid name beside it); else a download into that cache (unless ``download`` is False or
    ``HF_HUB_OFFLINE``/``GMFLOW_OFFLINE`` is set).

    Raises:
        CheckpointError: ``path`` does not exist, or no cached file and no download possible; the
            message names the file to provide and where to put it.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise CheckpointError(
                f"--inception-weights {p} does not exist; pass the path of torch-fidelity's "
                f"{INCEPTION_WEIGHTS_FILE} (download it from {INCEPTION_WEIGHTS_URL})"
            )
        return p
    cache = inception_cache_path()
    for name in (INCEPTION_WEIGHTS_FILE, *INCEPTION_WEIGHTS_ALIASES):
        if (cache.parent / name).is_file():
            return cache.parent / name
    if not download or _offline():
        raise _missing_weights(f"{cache} does not exist and downloads are off")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
    try:
        with (
            urllib.request.urlopen(INCEPTION_WEIGHTS_URL, timeout=DOWNLOAD_TIMEOUT_S) as r,
            open(tmp, "wb") as f,
        ):
            shutil.copyfileobj(r, f)
        os.replace(tmp, cache)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        tmp.unlink(missing_ok=True)
        raise _missing_weights(f"{cache} does not exist and the download failed: {err}") from err
    logger.info("downloaded %s to %s", INCEPTION_WEIGHTS_URL, cache)
    return cache


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _inception_class() -> type:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


class InceptionFeatures:
    """torch-fidelity's ``inception-v3-compat`` returning (pool 2048, logits without bias 1008).

    ``extractor_id`` = ``inception-v3-compat/sha256:<first 16 hex of the weights file>``, so
    features from other weights (e.g. random test weights) never mix in a cache.

    Raises:
        CheckpointError: the file is not a state dict of this network.
    """

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu") -> None:
        weights_path = Path(weights_path)
        try:
            self.model = _inception_class()(
                INCEPTION_EXTRACTOR,
                [POOL, LOGITS],
                feature_extractor_weights_path=str(weights_path),
            )
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(
                f"{weights_path} is not torch-fidelity's Inception-v3 state dict ({first}); "
                f"provide {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}"
            ) from err
        self.device = torch.device(device)
        self.model.to(self.device)
        self.extractor_id = f"{INCEPTION_EXTRACTOR}/sha256:{_file_sha256(weights_path)[:16]}"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pool, logits = self.model(images.to(self.device))
        return pool.float().cpu(), logits.float().cpu()


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised ``inception-v3-compat`` state dict (tests and benchmarks only).

    Convolutions get Kaiming-normal weights (fan-in, ReLU gain), so activations keep their scale
    through the 94 conv + ReLU layers and the features depend on the image; batch norms keep
    their identity statistics; the output layer is N(0, 1/2048). The file loads through
    ``feature_extractor_weights_path`` exactly like the real one.
    """
    import tempfile

    cls = _inception_class()

    class _Unloaded(cls):  # type: ignore[misc, valid-type]
        def load_state_dict(self, *args: object, **kwargs: object) -> None:  # keep the init
            return None

    g = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        model = _Unloaded(INCEPTION_EXTRACTOR, [POOL], feature_extractor_weights_path=str(empty))
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
    torch.nn.init.normal_(model.fc.weight, std=2048**-0.5, generator=g)
    torch.nn.init.zeros_(model.fc.bias)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


@dataclass(frozen=True)
class Features:
    """Features of a set of N images."""

    pool: NDArray[np.float32]  # (N, D)
    logits: NDArray[np.float32] | None  # (N, L), None when not computed (a reference set)


@dataclass(frozen=True)
class FIDStats:
    """Mean and covariance of pool features, float64."""

    mu: NDArray[np.float64]  # (D,)
    sigma: NDArray[np.float64]  # (D, D), unbiased (N − 1) covariance


def extract_features(
    batches: Iterable[NDArray[np.uint8]], extractor: FeatureExtractor, batch_size: int = 100
) -> Features:
    """Features of uint8 NHWC images given in batches of any size (re-batched to ``batch_size``).

    Args:
        batches: arrays (B, H, W, C) uint8, C = 3 (C = 1 is repeated to RGB); sizes may change
            between batches (each call of the extractor sees one size).
        extractor: see :class:`FeatureExtractor`.
        batch_size: images per extractor call.
    """
    pools: list[NDArray[np.float32]] = []
    logits: list[NDArray[np.float32]] = []
    pending: list[NDArray[np.uint8]] = []

    def flush() -> None:
        if not pending:
            return
        x = torch.from_numpy(np.concatenate(pending)).permute(0, 3, 1, 2).contiguous()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        p, lg = extractor(x)
        pools.append(p.detach().float().cpu().numpy())
        logits.append(lg.detach().float().cpu().numpy())
        pending.clear()

    for batch in batches:
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] not in (1, 3):
            raise ValueError(f"expected uint8 images (B, H, W, 3), got {batch.dtype} {batch.shape}")
        while len(batch):
            if pending and pending[0].shape[1:] != batch.shape[1:]:
                flush()
            room = batch_size - sum(len(b) for b in pending)
            pending.append(batch[:room])
            batch = batch[room:]
            if sum(len(b) for b in pending) == batch_size:
                flush()
    flush()
    if not pools:
        raise ValueError("extract_features: no images")
    return Features(pool=np.concatenate(pools), logits=np.concatenate(logits))


def fid_statistics(pool: NDArray[np.floating]) -> FIDStats:
    """μ and Σ of features (N, D) with torch-fidelity's ``fid_features_to_statistics`` (float64)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if pool.ndim != 2 or len(pool) < 2:
        raise ValueError(f"FID statistics need features (N >= 2, D), got shape {pool.shape}")
    stats = fid_features_to_statistics(torch.from_numpy(np.asarray(pool, dtype=np.float64)))
    return FIDStats(mu=np.asarray(stats["mu"]), sigma=np.atleast_2d(stats["sigma"]))


def compute_metrics(
    generated: Features,
    reference: FIDStats,
    reference_pool: NDArray[np.floating] | None,
    *,
    prc_neighborhood: int = 3,
    use_kid: bool = False,
    kid_subset_size: int = 1000,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """FID, IS (when logits are given), precision/recall and KID (when reference features are).

    Args:
        generated: features of the samples.
        reference: μ, Σ of the reference set.
        reference_pool: reference features (N_ref, D) for precision/recall and KID, or None
            (statistics-only references, e.g. an ADM ``.npz`` without ``arr_0``).
        prc_neighborhood: k of the k-NN radii.
        use_kid: also KID (needs ``reference_pool``).
        kid_subset_size: KID subset size (<= both set sizes).
        device: where the k-NN distances are computed.

    Returns:
        ``fid``; ``is``, ``is_std``; ``precision``, ``recall``; ``kid``, ``kid_std`` — each only
        when computable.
    """
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    gen = fid_statistics(generated.pool)
    out = {
        "fid": float(
            fid_statistics_to_metric(
                {"mu": gen.mu, "sigma": gen.sigma},
                {
                    "mu": reference.mu.astype(np.float64),
                    "sigma": reference.sigma.astype(np.float64),
                },
                False,
            )["frechet_inception_distance"]
        )
    }
    if generated.logits is not None:
        n = len(generated.logits)
        isc = isc_features_to_metric(torch.from_numpy(generated.logits), splits=min(10, n))
        out["is"], out["is_std"] = (
            float(isc["inception_score_mean"]),
            float(isc["inception_score_std"]),
        )
    if reference_pool is None:
        return out
    x = torch.from_numpy(np.asarray(generated.pool, dtype=np.float32)).to(device)
    y = torch.from_numpy(np.asarray(reference_pool, dtype=np.float32)).to(device)
    prc = prc_features_to_metric(
        x, y, prc_neighborhood=prc_neighborhood, save_cpu_ram=True, verbose=False
    )
    out["precision"], out["recall"] = float(prc["precision"]), float(prc["recall"])
    if use_kid:
        kid = kid_features_to_metric(
            x.cpu(), y.cpu(), kid_subset_size=kid_subset_size, verbose=False
        )
        out["kid"] = float(kid["kernel_inception_distance_mean"])
        out["kid_std"] = float(kid["kernel_inception_distance_std"])
    if not all(math.isfinite(v) for v in out.values()):
        logger.warning("non-finite metrics: %s", out)
    return out
