"""Every numba.cuda kernel compiles to PTX for the real CUDA target, without a GPU.

The simulator (test_cuda_kernels.py, test_cuda_eigh.py) runs the kernels' Python; this compiles
them with NVVM, which types them as the GPU would (math functions, dtypes of constants, local
arrays). Skipped where NVVM is not installed, and under the simulator.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="the simulator has no PTX compiler"
)


@pytest.fixture(scope="module")
def cuda():  # type: ignore[no-untyped-def]
    from gmflow.gm._numba_compat import import_numba_cuda

    cuda = import_numba_cuda()
    try:
        from numba import types

        def probe(out):  # type: ignore[no-untyped-def]
            out[0] = 1.0

        cuda.compile_ptx(probe, (types.float32[::1],), cc=(8, 0))
    except Exception as err:  # noqa: BLE001 - no NVVM/toolkit: nothing to check here
        pytest.skip(f"numba.cuda cannot compile PTX here ({type(err).__name__}: {err})")
    return cuda


def _signatures(dtype_name: str):  # type: ignore[no-untyped-def]
    from numba import types

    f = getattr(types, dtype_name)
    a2, a3, a4 = f[:, ::1], f[:, :, ::1], f[:, :, :, ::1]
    a1 = f[::1]
    i = types.int64
    return {
        "inverse_cdf": (a3, a3, a2, a3, a3, a3, i, f, f),
        "condition_mean": (a4, a3, a2, a1, a3, a3, f),
        "logprob": (a4, a3, a2, a4, a3),
        "symmetric_eigh": (a3, a2, a3, i),
    }


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_every_kernel_compiles_to_ptx(cuda, dtype_name):
    from gmflow.gm import cuda_eigh, cuda_kernels

    kernels = vars(cuda_kernels._kernels(dtype_name)) | {
        "symmetric_eigh": cuda_eigh._kernel(dtype_name)
    }
    signatures = _signatures(dtype_name)
    assert set(kernels) == set(signatures)
    for name, kernel in kernels.items():
        ptx, _ = cuda.compile_ptx(kernel.py_func, signatures[name], cc=(8, 0))
        assert ".entry" in ptx, name
        if dtype_name == "float32":  # fp32 kernels keep fp32 arithmetic: no f64 ops sneak in
            assert "add.f64" not in ptx and "mul.f64" not in ptx, name
