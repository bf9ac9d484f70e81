"""The training objective (gmflow.training.build.GMFlowObjective): GM maths stays fp32."""

from __future__ import annotations

import torch
from torch import nn

from gmflow.gm import GaussianMixture
from gmflow.models.spectrum import SpectrumMLP
from gmflow.run_config import LossConfig
from gmflow.training.build import GMFlowObjective


class _FixedGM(nn.Module):
    """A denoiser with no matmul (so autocast cannot change its output): μ = x_t·a + b."""

    def __init__(self, k: int, c: int, h: int, w: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(0.3 * torch.randn(1, k, c, h, w, generator=g))
        self.b = nn.Parameter(torch.randn(1, k, c, h, w, generator=g))
        self.logits = nn.Parameter(torch.randn(1, k, 1, h, w, generator=g))

    def forward(self, x_t, sigma, labels):  # type: ignore[no-untyped-def]
        means = x_t.unsqueeze(1) * self.a + self.b
        logweights = self.logits.log_softmax(1).expand(x_t.shape[0], -1, -1, -1, -1)
        logstds = torch.full((x_t.shape[0], 1, 1, 1, 1), -0.5)
        return GaussianMixture(means, logweights, logstds)


def _objective() -> GMFlowObjective:
    torch.manual_seed(1)
    spectrum = SpectrumMLP(base_size=(4, 8, 8))
    with torch.no_grad():
        spectrum.layers[-1].weight.normal_(0, 0.3)  # a non-white spectrum
    return GMFlowObjective(_FixedGM(4, 4, 8, 8), spectrum, LossConfig())


def test_losses_are_fp32_under_bf16_autocast():
    """The KR map of the spectral loss uses einsum, which bf16 autocast would downcast."""
    objective = _objective()
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(6, dtype=torch.long)
    torch.manual_seed(3)
    plain = objective(x0, labels)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = objective(x0, labels)
    assert cast["loss"].dtype == torch.float32
    for key in ("loss_trans", "loss_spec", "loss", "gm_var"):
        assert cast["stats"][key] == plain["stats"][key], key
    grads = torch.autograd.grad(cast["loss"], list(objective.spectrum_net.parameters()))
    assert all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)


def test_stats_report_the_component_std_and_the_mixture_variance():
    objective = _objective()
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    stats = objective(x0, torch.zeros(3, dtype=torch.long))["stats"]
    assert abs(stats["gm_std"] - torch.tensor(-0.5).exp().item()) < 1e-6
    assert stats["gm_var"] > stats["gm_std"] ** 2  # the spread of the means adds to s²
    assert {"loss", "loss_trans", "loss_spec"} <= set(stats)
