"""gmflow.evaluation.fid: metrics against independent references and closed forms; weights."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from gmflow.errors import CheckpointError
from gmflow.evaluation import fid
from gmflow.evaluation.fid import (
    INCEPTION_WEIGHTS_FILE,
    Features,
    InceptionFeatures,
    compute_metrics,
    extract_features,
    fid_statistics,
    resolve_inception_weights,
)


def _features(n: int, d: int, seed: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features
    return (rng.normal(size=(n, d)) @ mix * scale + rng.normal(size=d)).astype(np.float32)


def _fid(x: np.ndarray, y: np.ndarray) -> float:
    out = compute_metrics(Features(x, None), fid_statistics(y), None)
    assert set(out) == {"fid"}  # no logits, no reference features: FID only
    return out["fid"]


def test_fid_matches_scipy_sqrtm_reference():
    x, y = _features(300, 12, 0), _features(250, 12, 1, scale=1.5)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    mu1, mu2 = x64.mean(0), y64.mean(0)
    s1, s2 = np.cov(x64, rowvar=False), np.cov(y64, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    np.testing.assert_allclose(_fid(x, y), expected, rtol=1e-8)


def test_fid_of_a_set_with_itself_is_zero_and_a_mean_shift_costs_its_squared_norm():
    x = _features(200, 8, 2)
    assert abs(_fid(x, x)) < 1e-9
    d = np.linspace(-1, 1, 8).astype(np.float32)
    # Σ unchanged, μ moved by d: FID = ‖d‖² exactly
    np.testing.assert_allclose(_fid(x, x + d), float((d.astype(np.float64) ** 2).sum()), rtol=1e-5)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_fid_of_a_scaled_set_is_one_minus_c_squared_times_the_trace(c):
    # y = μ + c (x − μ): Σ_y = c² Σ, (Σ Σ_y)^{1/2} = c Σ  =>  FID = (1 − c)² tr Σ
    x = _features(400, 6, 3).astype(np.float64)
    y = x.mean(0) + c * (x - x.mean(0))
    expected = (1 - c) ** 2 * np.trace(np.cov(x, rowvar=False))
    np.testing.assert_allclose(
        _fid(x.astype(np.float32), y.astype(np.float32)), expected, rtol=1e-4
    )


def test_fid_grows_with_the_perturbation():
    x = _features(300, 10, 4)
    noise = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)
    fids = [_fid(x, x + s * noise) for s in (0.0, 0.1, 0.3, 1.0)]
    assert fids[0] < 1e-9 and all(a < b for a, b in zip(fids, fids[1:], strict=False))


def test_inception_score_matches_its_definition_over_splits():
    n, classes = 50, 7
    logits = np.random.default_rng(6).normal(0, 3, (n, classes)).astype(np.float32)
    ref = Features(np.zeros((n, 2), np.float32), logits)
    out = compute_metrics(ref, fid_statistics(_features(10, 2, 0)), None)
    # torch-fidelity shuffles with RandomState(2020), 10 splits; IS = exp E KL(p(y|x) ‖ p(y))
    p = torch.from_numpy(logits[np.random.RandomState(2020).permutation(n)]).double().softmax(1)
    scores = []
    for k in range(10):
        part = p[k * n // 10 : (k + 1) * n // 10]
        kl = (part * (part.log() - part.mean(0, keepdim=True).log())).sum(1)
        scores.append(kl.mean().exp().item())
    np.testing.assert_allclose([out["is"], out["is_std"]], [np.mean(scores), np.std(scores)])


def test_inception_score_of_identical_predictions_is_one():
    logits = np.tile(np.arange(5, dtype=np.float32), (40, 1))
    out = compute_metrics(
        Features(np.zeros((40, 2), np.float32), logits), fid_statistics(_features(9, 2, 1)), None
    )
    np.testing.assert_allclose(out["is"], 1.0, atol=1e-12)


def _brute_force_prc(x: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float]:
    def radii(a: np.ndarray) -> np.ndarray:  # distance to the k-th nearest other point
        d = np.linalg.norm(a[:, None] - a[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    dxy = np.linalg.norm(x[:, None] - y[None], axis=-1)  # (Nx, Ny)
    dyx = dxy.T
    precision = (dxy <= radii(y)[None]).any(1).mean()
    recall = (dyx <= radii(x)[None]).any(1).mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_match_brute_force_knn(k):
    x, y = _features(60, 5, 8), _features(45, 5, 9, scale=1.3)
    out = compute_metrics(Features(x, None), fid_statistics(y), y, prc_neighborhood=k)
    expected = _brute_force_prc(x.astype(np.float64), y.astype(np.float64), k)
    assert (out["precision"], out["recall"]) == pytest.approx(expected, abs=1e-6)  # float32 mean
    assert 0 < out["precision"] < 1 and 0 < out["recall"] < 1  # a test that can tell them apart


def test_precision_and_recall_of_a_set_against_itself_are_one():
    x = _features(40, 4, 10)
    out = compute_metrics(Features(x, None), fid_statistics(x), x)
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and abs(out["fid"]) < 1e-9


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one():
    x, x2 = _features(200, 6, 11), _features(200, 6, 11)[::-1].copy()
    same = compute_metrics(
        Features(x, None), fid_statistics(x2), x2, use_kid=True, kid_subset_size=50
    )
    shifted = x + 2.0
    far = compute_metrics(
        Features(x, None), fid_statistics(shifted), shifted, use_kid=True, kid_subset_size=50
    )
    assert abs(same["kid"]) < 3 * same["kid_std"] + 1e-3
    assert far["kid"] > 20 * (abs(same["kid"]) + same["kid_std"])


def test_extract_features_rebatches_and_accepts_grey_and_mixed_sizes(stub):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 8, 8, 3), dtype=np.uint8)
    whole = extract_features([images], stub, batch_size=100)
    pieces = extract_features([images[:2], images[2:9], images[9:]], stub, batch_size=3)
    np.testing.assert_array_equal(whole.pool, pieces.pool)
    np.testing.assert_array_equal(whole.logits, pieces.logits)
    grey = rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    mixed = extract_features([grey, rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)], stub, 4)
    np.testing.assert_array_equal(
        mixed.pool[:2], extract_features([np.repeat(grey, 3, axis=-1)], stub).pool
    )
    assert mixed.pool.shape == (5, 16)


# ---- weights -------------------------------------------------------------------------------


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("GMFLOW_OFFLINE", raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_missing_weights_offline_names_the_file_and_the_cache(empty_torch_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        resolve_inception_weights(None)
    msg = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in msg and str(empty_torch_home) in msg
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "--inception-weights" in msg


def test_failed_download_gives_the_same_error(empty_torch_home, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fid.urllib.request, "urlopen", no_network)
    with pytest.raises(CheckpointError, match="download failed.*Name or service not known"):
        resolve_inception_weights(None)
    assert not any(empty_torch_home.iterdir())  # no partial file left behind


@pytest.mark.parametrize("name", [INCEPTION_WEIGHTS_FILE, "pt_inception-2015-12-05-6726825d.pth"])
def test_weights_are_found_in_the_torch_hub_cache(empty_torch_home, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty_torch_home.mkdir(parents=True)
    (empty_torch_home / name).write_bytes(b"weights")
    assert resolve_inception_weights(None) == empty_torch_home / name
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_inception_weights(empty_torch_home / "nope.pth")


def test_a_wrong_weights_file_is_refused(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="not torch-fidelity's Inception-v3 state dict"):
        InceptionFeatures(path)


@pytest.mark.slow
def test_random_inception_weights_give_image_dependent_features(inception_weights):
    extractor = InceptionFeatures(inception_weights)
    assert extractor.extractor_id.startswith("inception-v3-compat/sha256:")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    images[1] = 255
    pool, logits = extractor(images)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert (pool >= 0).all()  # average of ReLU outputs
    assert (pool[0] - pool[1]).norm() > 0.1 * pool[0].norm()  # not degenerate
    # logits are the output layer without its bias: pool @ W.T
    w = torch.load(inception_weights)["fc.weight"]
    torch.testing.assert_close(logits, pool @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_image_level_fid_is_zero_on_itself_and_grows_with_noise(inception_weights, reference_npz):
    extractor = InceptionFeatures(inception_weights)
    images = np.load(reference_npz)["arr_0"][:6]
    noise = np.random.default_rng(3).normal(0, 1, images.shape)
    ref = extract_features([images], extractor)
    stats = fid_statistics(ref.pool)
    fids = []
    for s in (0, 25, 80):
        noisy = (images + s * noise).clip(0, 255).astype(np.uint8)
        feats = ref if s == 0 else extract_features([noisy], extractor)
        fids.append(compute_metrics(feats, stats, ref.pool)["fid"])
    # sqrt of the ~1e-13 round-off eigenvalues of the rank-deficient Σ Σ leaves ~1e-6 on itself
    assert abs(fids[0]) < 1e-3 * fids[1] and 0 < fids[1] < fids[2]
