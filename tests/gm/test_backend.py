"""Backend selection rules, GMFLOW_GM_BACKEND forcing and its errors (spec 7.15)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from gmflow.errors import ConfigError, GMFlowError
from gmflow.gm import GaussianMixture, backend, gm_condition_mean, gm_logprob


@dataclass
class FakeTensor:
    """Stands in for a tensor on a device this machine lacks: selection reads only these fields."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    requires_grad: bool = False


def cpu(requires_grad=False, dtype=torch.float32):
    return torch.zeros(2, dtype=dtype, requires_grad=requires_grad)


def cuda():
    return FakeTensor(torch.device("cuda", 0))


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)


@pytest.mark.parametrize("op", backend.OPS)
def test_auto_uses_numba_cpu_without_grad(auto, op):
    expected = "numba-cpu" if op in backend._CPU_AUTO_OPS else "torch"
    assert backend.selected_backend(op, cpu(), cpu()) == expected


@pytest.mark.parametrize("op", backend.OPS)
def test_auto_uses_torch_under_autograd(auto, op):
    assert backend.selected_backend(op, cpu(), cpu(requires_grad=True)) == "torch"
    assert backend.kernel_for(op, cpu(), cpu(requires_grad=True)) is None


def test_auto_ignores_requires_grad_under_no_grad(auto):
    with torch.no_grad():
        assert backend.selected_backend("gm_logprob", cpu(requires_grad=True)) == "numba-cpu"


def test_auto_uses_torch_for_other_dtypes_and_mixed_devices(auto):
    assert backend.selected_backend("gm_logprob", cpu(dtype=torch.bfloat16)) == "torch"
    assert backend.selected_backend("gm_logprob", cpu(), cuda()) == "torch"


def test_auto_on_cuda_depends_on_numba_cuda(auto, monkeypatch):
    monkeypatch.setattr(backend, "_cuda_op_works", lambda op: True)
    assert backend.selected_backend("gm1d_inverse_cdf", cuda(), cuda()) == "numba-cuda"
    monkeypatch.setattr(backend, "_cuda_op_works", lambda op: False)
    assert backend.selected_backend("gm1d_inverse_cdf", cuda(), cuda()) == "torch"


def test_auto_on_cuda_uses_kernels_only_where_they_beat_torch(auto, monkeypatch):
    """On an H100 only the inverse CDF kernel wins (x8.5); the one-pass kernels lose to numba's
    launch overhead (benchmarks/results/gm_ops.md), so auto keeps torch for them on CUDA."""
    monkeypatch.setattr(backend, "_cuda_op_works", lambda op: True)
    assert backend.selected_backend("gm1d_inverse_cdf", cuda()) == "numba-cuda"
    assert backend.selected_backend("gm_condition_mean", cuda()) == "torch"
    assert backend.selected_backend("gm_logprob", cuda()) == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "numba")  # forcing still reaches every kernel
    assert backend.selected_backend("gm_condition_mean", cuda()) == "numba-cuda"


@pytest.mark.parametrize("env", ["auto", "numba", "torch"])
def test_cuda_only_ops_use_torch_off_cuda(monkeypatch, env):
    """symmetric_eigh has no numba-cpu kernel: LAPACK on CPU, whatever the variable says."""
    monkeypatch.setenv(backend.ENV_VAR, env)
    assert backend.selected_backend("symmetric_eigh", cpu()) == "torch"
    assert backend.selected_backend("symmetric_eigh", torch.zeros(2, device="meta")) == "torch"
    assert backend.kernel_for("symmetric_eigh", cpu()) is None
    monkeypatch.setattr(backend, "_cuda_op_works", lambda op: True)
    want = "torch" if env == "torch" else "numba-cuda"
    assert backend.selected_backend("symmetric_eigh", cuda()) == want


def test_eigh_probe_checks_the_answer():
    r = 0.5**0.5
    good = (torch.tensor([3.0, 1.0]), torch.tensor([[r, r], [r, -r]]))
    backend._check_probe("symmetric_eigh", good)
    for bad in ((good[0].flip(0), good[1]), (good[0], -good[1])):  # order, canonical sign
        with pytest.raises(RuntimeError, match="wrong eigen-decomposition"):
            backend._check_probe("symmetric_eigh", bad)


@pytest.fixture
def fresh_probe(monkeypatch):
    backend._cuda_op_works.cache_clear()
    monkeypatch.setattr(backend, "_CUDA_FAILURES", {})
    yield
    backend._cuda_op_works.cache_clear()


def test_a_numba_cuda_kernel_that_cannot_compile_falls_back_to_torch(
    auto, monkeypatch, fresh_probe
):
    """numba-cuda present but broken (e.g. an unsupported NumPy): warn once, use torch."""

    def broken(*args, **kwargs):
        raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(backend, "_numba_cuda_usable", lambda: True)
    monkeypatch.setattr(backend, "_probe_inputs", lambda op, device: ())  # no GPU needed here
    monkeypatch.setitem(backend._WRAPPERS, "gm1d_inverse_cdf", broken)
    with pytest.warns(RuntimeWarning, match="cannot run here.*row_stack.*torch reference"):
        assert backend.selected_backend("gm1d_inverse_cdf", cuda()) == "torch"
    assert backend.selected_backend("gm1d_inverse_cdf", cuda()) == "torch"  # cached, no rerun
    monkeypatch.setenv(backend.ENV_VAR, "numba")
    with pytest.raises(ConfigError, match="kernel cannot run.*row_stack"):
        backend.selected_backend("gm1d_inverse_cdf", cuda())


def test_a_numba_cuda_kernel_with_a_wrong_answer_falls_back_to_torch(
    auto, monkeypatch, fresh_probe
):
    monkeypatch.setattr(backend, "_numba_cuda_usable", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(backend, "_probe_inputs", lambda op, device: (torch.eye(2),))
    monkeypatch.setitem(backend._WRAPPERS, "symmetric_eigh", lambda launch, a: (a[0], a))
    with pytest.warns(RuntimeWarning, match="symmetric_eigh cannot run here.*wrong eigen"):
        assert backend.selected_backend("symmetric_eigh", cuda()) == "torch"


def test_env_torch_forces_the_reference(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.kernel_for("gm_logprob", cpu()) is None
    monkeypatch.setattr(backend, "_cuda_op_works", lambda op: True)
    assert backend.selected_backend("gm_logprob", cuda()) == "torch"


@pytest.mark.parametrize("value", ["numba", " NUMBA "])
def test_env_numba_forces_the_kernels(monkeypatch, value):
    monkeypatch.setenv(backend.ENV_VAR, value)
    assert backend.selected_backend("gm_condition_mean", cpu()) == "numba-cpu"
    monkeypatch.setattr(backend, "_cuda_op_works", lambda op: True)
    assert backend.selected_backend("gm_condition_mean", cuda()) == "numba-cuda"


def test_env_numba_with_grad_raises(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "numba")
    with pytest.raises(ConfigError, match="require grad"):
        backend.selected_backend("gm_logprob", cpu(requires_grad=True))


def test_env_numba_on_cuda_without_numba_cuda_raises(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "numba")
    monkeypatch.setattr(backend, "_numba_cuda_usable", lambda: False)
    backend._cuda_op_works.cache_clear()
    with pytest.raises(ConfigError, match="no usable GPU"):
        backend.selected_backend("gm_logprob", cuda())


def test_env_numba_on_unsupported_inputs_raises(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "numba")
    with pytest.raises(ConfigError, match="one device"):
        backend.selected_backend("gm_logprob", cpu(), cuda())
    with pytest.raises(ConfigError, match="meta"):
        backend.selected_backend("gm_logprob", torch.zeros(2, device="meta"))


@pytest.mark.parametrize("value", ["cuda", "numba-cpu", "jax"])
def test_unknown_env_value_raises(monkeypatch, value):
    monkeypatch.setenv(backend.ENV_VAR, value)
    with pytest.raises(ConfigError, match="expected 'torch', 'numba' or 'auto'") as info:
        backend.kernel_for("gm_logprob", cpu())
    assert isinstance(info.value, GMFlowError)


@pytest.mark.parametrize("value", ["", "auto", "AUTO"])
def test_auto_values(monkeypatch, value):
    monkeypatch.setenv(backend.ENV_VAR, value)
    assert backend.requested_backend() == "auto"


def test_unknown_op_is_a_bug():
    with pytest.raises(ValueError, match="unknown op"):
        backend.kernel_for("gm_mul_gm", cpu())


def test_public_op_reports_forced_numba_under_autograd(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "numba")
    means = torch.zeros(1, 2, 1, 1, 1, requires_grad=True)
    gm = GaussianMixture(means, torch.full((1, 2, 1, 1, 1), -0.7), torch.zeros(1, 1, 1, 1, 1))
    with pytest.raises(ConfigError, match="torch.no_grad"):
        gm_logprob(gm, torch.zeros(1, 1, 1, 1, 1))
    with torch.no_grad():
        out = gm_condition_mean(gm, 1.0, torch.zeros(1, 1, 1, 1))
    torch.testing.assert_close(out, torch.zeros(1, 1, 1, 1))


def test_importing_gmflow_gm_loads_neither_numba_nor_cuda():
    code = "import sys, gmflow.gm; print([m for m in ('numba', 'numba.cuda') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
