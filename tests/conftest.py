"""Shared test fixtures: a fixed seed, a random Gaussian-mixture factory, the shared fixtures dir.

Keep this file small: fixtures used by one test module belong in that module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from gmflow.gm import GaussianMixture

SEED = 0
"""The seed of every test (global torch RNG and the ``generator`` fixture)."""

FIXTURES_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"
"""Tiny official checkpoints with reference outputs (read-only, outside the repo)."""


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    """Seed torch's global RNG before every test, so that tests do not depend on their order."""
    torch.manual_seed(SEED)


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator seeded with :data:`SEED` (pass it to samplers for reproducible draws)."""
    return torch.Generator().manual_seed(SEED)


def make_random_gm(
    K: int,
    C: int,
    H: int,
    W: int,
    batch: tuple[int, ...] = (2,),
    dtype: torch.dtype = torch.float64,
    per_component_std: bool = False,
    generator: torch.Generator | None = None,
    std_range: tuple[float, float] = (0.05, 2.0),
) -> GaussianMixture:
    """Return a random GM.

    Means ~ N(0, 1), log A = log_softmax(2·N(0, 1)), s log-uniform in ``std_range``.

    Args:
        K, C, H, W: components, channels, height, width.
        batch: the leading batch dims.
        dtype: dtype of every field.
        per_component_std: logstds (..., K, 1, 1, 1) instead of (..., 1, 1, 1, 1).
        generator: the random source (torch's global RNG when None).
        std_range: (s_min, s_max); spec 16 uses [0.05, 2].
    """

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    means = randn(*batch, K, C, H, W)
    logweights = torch.log_softmax(2.0 * randn(*batch, K, 1, H, W), dim=-4)
    lo, hi = math.log(std_range[0]), math.log(std_range[1])
    k_std = K if per_component_std else 1
    u = torch.rand(*batch, k_std, 1, 1, 1, generator=generator, dtype=torch.float64)
    logstds = lo + (hi - lo) * u
    return GaussianMixture(means.to(dtype), logweights.to(dtype), logstds.to(dtype))


@pytest.fixture
def random_gm(generator: torch.Generator) -> Callable[..., GaussianMixture]:
    """Factory ``random_gm(K, C, H, W, batch=(2,), dtype=float64, per_component_std=False, ...)``.

    Successive calls in one test draw different mixtures from the seeded ``generator`` fixture;
    see :func:`make_random_gm` for the distribution of the parameters.
    """

    def factory(*args, **kwargs) -> GaussianMixture:  # type: ignore[no-untyped-def]
        kwargs.setdefault("generator", generator)
        return make_random_gm(*args, **kwargs)

    return factory


@pytest.fixture
def fixtures_dir() -> Path:
    """``<repo>/../shared/fixtures`` (tiny official checkpoints); skips the test where absent."""
    if not FIXTURES_DIR.is_dir():
        pytest.skip(
            f"shared fixtures not found at {FIXTURES_DIR.resolve()}; they live next to the "
            "repository checkout (../shared/fixtures) and are not part of it"
        )
    return FIXTURES_DIR.resolve()


def gm_distribution(gm: GaussianMixture) -> torch.distributions.MixtureSameFamily:
    """The same per-pixel mixture as ``torch.distributions``: batch (..., H, W), event (C,).

    An independent reference for log-densities and moments (it shares no code with ``gmflow.gm``).
    """
    # (..., K, C, H, W) -> (..., H, W, K, C)
    means = gm.means.movedim(-4, -1).movedim(-4, -1)
    scale = gm.logstds.exp().expand(*gm.logstds.shape[:-3], *gm.means.shape[-3:])
    scale = scale.movedim(-4, -1).movedim(-4, -1)
    means, scale = torch.broadcast_tensors(means, scale)
    logits = gm.logweights.squeeze(-3).movedim(-3, -1)  # (..., H, W, K)
    components = torch.distributions.Independent(torch.distributions.Normal(means, scale), 1)
    return torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits), components, validate_args=False
    )


def reference_gm_logprob(gm: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """log p(x) per pixel through :func:`gm_distribution`; x (..., n, C, H, W) -> (..., n, H, W)."""
    dist = gm_distribution(gm)
    xs = x.movedim(-3, -1).movedim(-4, 0)  # (n, ..., H, W, C)
    return dist.log_prob(xs).movedim(0, -3)


@pytest.fixture
def ref_gm_logprob() -> Callable[[GaussianMixture, torch.Tensor], torch.Tensor]:
    """The independent reference mixture log-density :func:`reference_gm_logprob`."""
    return reference_gm_logprob


@pytest.fixture
def to_torch_mixture() -> Callable[[GaussianMixture], torch.distributions.MixtureSameFamily]:
    """The converter :func:`gm_distribution` (reference means, variances, log-densities)."""
    return gm_distribution


@pytest.fixture(params=["torch", "auto"])
def gm_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test twice: on the torch reference, then on the automatic backend choice.

    On CPU without autograd, 'auto' runs the numba-cpu kernels of the hot ops (gm_logprob,
    gm_condition_mean, gm1d_inverse_cdf), so one test checks both against its reference.
    """
    monkeypatch.setenv("GMFLOW_GM_BACKEND", request.param)
    return request.param


# ---- evaluation: a stub feature extractor, random Inception weights, a reference batch ----------
# The Inception-v3 of torch-fidelity runs at 299 x 299 (about 0.6 s per image on the 2-core CI
# machine), so most tests use StubExtractor (an injected extractor, as ``evaluate`` and ``train``
# allow) and the real network with random weights only runs in a few ``slow`` tests on few images.


class StubExtractor:
    """A cheap, deterministic, image-dependent stand-in for Inception (8 x 8 pooled pixels).

    pool = tanh(P x) with x the image average-pooled to 8 x 8 in [0, 1] (192 values) and P a fixed
    Gaussian (16, 192) matrix; logits = L pool with L (10, 16).
    """

    extractor_id = "stub-extractor/1"

    def __init__(self, dim: int = 16) -> None:
        g = torch.Generator().manual_seed(1234)
        self.proj = torch.randn(192, dim, generator=g, dtype=torch.float64) / 4
        self.head = torch.randn(dim, 10, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.calls += 1
        x = torch.nn.functional.adaptive_avg_pool2d(images.double() / 255, 8).flatten(1)
        pool = torch.tanh(x @ self.proj)
        return pool.float(), (pool @ self.head).float()


@pytest.fixture
def stub() -> StubExtractor:
    return StubExtractor()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's Inception-v3 with Kaiming-random convolutions, saved once per session."""
    from gmflow.evaluation.fid import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth")


@pytest.fixture(scope="session")
def reference_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 smooth random 8 x 8 RGB images as an ADM-style reference batch (arr_0)."""
    rng = np.random.default_rng(7)
    low = rng.uniform(0, 255, (24, 2, 2, 3))
    images = np.kron(low, np.ones((1, 4, 4, 1))) + rng.normal(0, 20, (24, 8, 8, 3))
    path = tmp_path_factory.mktemp("reference") / "ref.npz"
    np.savez(path, arr_0=images.clip(0, 255).astype(np.uint8))
    return path


@pytest.fixture(scope="session")
def pixel_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``gmflow cache-data`` pixel shards of 3 classes x 6 random 8 x 8 RGB images (a folder)."""
    from PIL import Image

    from gmflow.data.cache import CacheConfig, cache_latents

    root = tmp_path_factory.mktemp("pixel_shards")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "images" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            img = (rng.random((8, 8, 3)) * 80 + 60 * c).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / f"class{c}" / f"{i}.png")
    cache_latents(
        CacheConfig(
            source=root / "images", out_dir=root / "data", vae="none", resolution=8, num_workers=0
        )
    )
    return root / "data"


@pytest.fixture
def torchrun_cli() -> Callable[..., str]:
    """``run(*args)``: ``torchrun --nproc_per_node=2 -m gmflow_cli *args`` on CPU; returns its
    stderr, fails the test on a non-zero exit, and never leaves workers behind."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]

    def run(*args: str, timeout: float = 600) -> str:
        with socket.socket() as s:  # a free port: torchrun's --master_port=0 hangs its rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--master_port={port}", "-m", "gmflow_cli", *args,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            _, stderr = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 0, stderr[-3000:]
        return stderr

    return run
