"""No sampling step reads device data back to the host: checked on the meta device, without a GPU.

On a GPU the host queues a step's kernels while the network still runs, so the GM machinery is
nearly free end to end, unless something waits for the queue: reading a value (``.item()``,
``bool(t)``, data-dependent shapes like ``nonzero``), a LAPACK-style op that checks its error
flag on the host (``linalg.eigh``), or a host-to-device copy of data built on the host (index
tensors, ``torch.tensor(...)``), which from pageable memory also waits (issue 4; the end-to-end
rows of benchmarks/results/sampling.md). The GPU tests (``set_sync_debug_mode("error")`` in
tests/test_sampling.py) cover the same on CUDA, with the numba-cuda kernels; these run the
torch paths, the ones MPS and CUDA-without-numba take, in every CI run.

Meta tensors have no data, so any read fails there anyway; the dispatch mode below also catches
the ops that succeed on meta but would sync on CUDA, and names where they were called from.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gmflow.flow import sample
from gmflow.models.gmdit import build_gmdit
from gmflow.models.spectrum import SpectrumMLP

SYNCING_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), bool(t), float(t), int(t)
        "nonzero",  # also boolean-mask indexing
        "masked_select",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "repeat_interleave",
        "linalg_eigh",
        "_linalg_eigh",
        "_linalg_check_errors",
    }
)


COPY_OPS = frozenset({"_to_copy", "copy_", "copy"})


def _host_tensor(t: object, copied: bool) -> bool:
    """A host tensor that goes to the device: copied, or (unless 0-dim, which kernels take as a
    scalar on the host) an operand of a device op."""
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and (copied or t.dim() > 0)


TENSOR_FROM_DATA = frozenset({torch.tensor, torch.as_tensor, torch.asarray})


def _where() -> str:
    frames = [
        f"{f.filename.split('/gmflow/')[-1]}:{f.lineno} {f.name}"
        for f in traceback.extract_stack()
        if "/gmflow/" in f.filename and "/tests/" not in f.filename
    ]
    return " <- ".join(reversed(frames[-4:]))


class _DispatchReads(TorchDispatchMode):
    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        inputs = [*args, *kwargs.values()]
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.found.append(f"{func} from {_where()}")  # before running it: meta refuses most
        out = func(*args, **kwargs)
        outputs = out if isinstance(out, tuple | list) else (out,)
        on_device = any(
            isinstance(t, torch.Tensor) and t.device.type == "meta" for t in [*inputs, *outputs]
        )
        if on_device and any(_host_tensor(t, name in COPY_OPS) for t in inputs):
            self.found.append(f"{func} from {_where()}")
        return out


class _FunctionReads(TorchFunctionMode):
    """``torch.tensor(data, device=...)`` copies below the dispatcher, so it is caught here."""

    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        device = kwargs.get("device")
        from_host_data = bool(args) and not isinstance(args[0], torch.Tensor)  # tensors: dispatched
        if (
            func in TENSOR_FROM_DATA
            and from_host_data
            and device is not None
            and torch.device(device).type != "cpu"
        ):
            self.found.append(f"{func.__name__}(..., device={device}) from {_where()}")
        return func(*args, **kwargs)


class HostReads:
    """Context manager: ``found`` lists every op that would make the host wait for the device."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self._modes = (_FunctionReads(self.found), _DispatchReads(self.found))

    def __enter__(self) -> HostReads:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def test_the_detector_sees_host_reads_and_copies():
    x = torch.ones(3, device="meta")
    with HostReads() as reads:
        x * torch.tensor(2.0)  # a 0-dim CPU scalar: the kernel takes it on the host
        torch.tensor([1.0, 2.0])  # host data staying on the host
        x + torch.ones(3).to("meta")
        torch.tensor(0.5, device="meta")
        with pytest.raises((NotImplementedError, RuntimeError)):  # meta refuses data reads
            x.nonzero()
        with pytest.raises((NotImplementedError, RuntimeError)):
            bool(x.sum())
    assert [f.split(" from ")[0] for f in reads.found] == [
        "aten._to_copy.default",
        "tensor(..., device=meta)",
        "aten.nonzero.default",
        "aten._local_scalar_dense.default",
    ]


CASES = {
    "gm-ode2 guided": ({"solver": "gm-ode", "order": 2, "num_substeps": 3}, 0.45),
    "gm-ode2 unguided": ({"solver": "gm-ode", "order": 2, "num_substeps": 2}, 0.0),
    "gm-sde2 guided spectral": ({"solver": "gm-sde", "order": 2, "spectrum": True}, 0.45),
    "gm-sde2 unguided spectral": ({"solver": "gm-sde", "order": 2, "spectrum": True}, 0.0),
    "gm-sde": ({"solver": "gm-sde"}, 0.45),
    "gm-sde2 guidance interval": (
        {"solver": "gm-sde", "order": 2, "spectrum": True, "guidance_interval": (0.2, 0.7)},
        0.45,
    ),
    "gm-ode2 orthogonal + correction": (
        {"solver": "gm-ode", "order": 2, "orthogonal_guidance": 0.5, "gm2_correction_steps": 2},
        0.45,
    ),
    "cfg": ({"solver": "euler", "guidance": "cfg"}, 2.0),
    "euler": ({"solver": "euler"}, 0.45),
    "heun": ({"solver": "heun"}, 0.45),
    "ddpm": ({"solver": "ddpm", "shift": 3.0}, 0.45),
}


@pytest.mark.parametrize(
    ("case", "size"),  # 8: the spectrum net crops its 16x16 spectrum; 16: it does not
    [(case, 8) for case in CASES] + [("gm-sde2 guided spectral", 16)],
)
def test_sampler_steps_never_read_the_device(case, size):
    """A whole run, GM-DiT network included, on the meta device: nothing syncs."""
    options, scale = CASES[case]
    options = dict(options)
    model = build_gmdit("S/2", num_gaussians=4, sample_size=size, num_classes=10, depth=1)
    model = model.to("meta").eval()
    if options.pop("spectrum", False):
        options["spectrum_net"] = SpectrumMLP(base_size=(4, 16, 16)).to("meta").eval()
    noise = torch.empty(2, 4, size, size, device="meta")
    labels = torch.empty(2, dtype=torch.long, device="meta")

    def run() -> torch.Tensor:
        return sample(
            model, noise, num_steps=3, guidance_scale=scale, null_class_id=10,
            class_labels=labels, **options,
        )  # fmt: skip

    with torch.no_grad():
        run()  # warm-up: per-device constants (the Jacobi rounds) are built and cached once
    with torch.no_grad(), HostReads() as reads:
        try:
            out = run()
        except (NotImplementedError, RuntimeError):
            if not reads.found:
                raise
    assert not reads.found, "ops that would wait for the GPU:\n" + "\n".join(reads.found)
    assert out.shape == noise.shape and out.device.type == "meta"
