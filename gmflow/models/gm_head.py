"""The GM output head of GM-DiT: tokens -> per-pixel Gaussian mixture over u (spec 2.2).

One linear projection maps each of the h·w tokens to p·p·K·(C+1) values. Unpatchify turns
them into a (K·(C+1))-channel image of size (h·p, w·p): the first K·C channels are the means
(channel g = k·C + c, component-major), the last K the mixture logits (log-softmaxed over K). The
log-std is one scalar per sample, produced by a small MLP from the *detached* conditioning
vector c, so it depends on (t, class) only and its loss does not back-propagate into the
embeddings:

    log s = Linear(SiLU(... SiLU(Linear(SiLU(c.detach()))) ...))          (B, 1, 1, 1, 1)

Initialisation (spec 2.2 item 7): the projection and the hidden log-std layers are Xavier-uniform
with zero bias, and the last log-std layer is zero, so a fresh head outputs s = 1 exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gmflow.gm import GaussianMixture

__all__ = ["GMHead", "unpatchify"]


def unpatchify(tokens: Tensor, grid_size: tuple[int, int], patch_size: int) -> Tensor:
    """Rearrange per-token patch vectors into an image (spec 2.2 item 3, oracle 40).

    The token at grid position (row, col) (row-major, index row·w + col) holds its values laid out
    as (p_row, p_col, g) with g fastest; value (p_row, p_col, g) lands at channel g, pixel
    (p·row + p_row, p·col + p_col).

    Args:
        tokens: (B, h·w, p·p·G).
        grid_size: (h, w), the token grid.
        patch_size: p.

    Returns:
        (B, G, h·p, w·p).
    """
    b, n, d = tokens.shape
    h, w = grid_size
    p = patch_size
    if n != h * w or d % (p * p) != 0:
        raise ValueError(
            f"unpatchify: tokens {tuple(tokens.shape)} do not fit a {h}x{w} grid of {p}x{p} "
            "patches; expected (B, h*w, p*p*G)"
        )
    g = d // (p * p)
    x = tokens.reshape(b, h, w, p, p, g)  # (B, h, w, pr, pc, G)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, g, h * p, w * p)


class GMHead(nn.Module):
    """Single-projection GM head with a per-sample log-std MLP (spec 2.2).

    Args:
        hidden_dim: D, the token and conditioning width.
        out_channels: C, channels of the modelled variable (4 for SD-VAE latents).
        patch_size: p.
        num_gaussians: K.
        logstd_inner_dim: width of the hidden log-std layers (1024 in the released model).
        num_logstd_layers: L; L − 1 hidden ``SiLU → Linear(·, inner)`` blocks, then
            ``SiLU → Linear(·, 1)``.
        constant_logstd: if set, log s is this constant and there is no MLP (with K = 1 this is
            plain flow matching with an L2 loss, spec 4.3 item 7).
    """

    def __init__(
        self,
        hidden_dim: int,
        out_channels: int,
        patch_size: int,
        num_gaussians: int,
        logstd_inner_dim: int = 1024,
        num_logstd_layers: int = 2,
        constant_logstd: float | None = None,
    ) -> None:
        super().__init__()
        if num_gaussians < 1 or num_logstd_layers < 1:
            raise ValueError(
                f"GMHead: num_gaussians ({num_gaussians}) and num_logstd_layers "
                f"({num_logstd_layers}) must be >= 1"
            )
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.num_gaussians = num_gaussians
        self.constant_logstd = constant_logstd
        self.proj = nn.Linear(
            hidden_dim, patch_size * patch_size * num_gaussians * (out_channels + 1)
        )
        self.logstd_mlp: nn.Sequential | None = None
        if constant_logstd is None:
            layers: list[nn.Module] = []
            width = hidden_dim
            for _ in range(num_logstd_layers - 1):
                layers += [nn.SiLU(), nn.Linear(width, logstd_inner_dim)]
                width = logstd_inner_dim
            layers += [nn.SiLU(), nn.Linear(width, 1)]
            self.logstd_mlp = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projection and hidden log-std layers (zero bias); last log-std layer 0."""
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        if self.logstd_mlp is not None:
            linears = [m for m in self.logstd_mlp if isinstance(m, nn.Linear)]
            for layer in linears[:-1]:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
            nn.init.zeros_(linears[-1].weight)
            nn.init.zeros_(linears[-1].bias)

    def forward(self, tokens: Tensor, cond: Tensor, grid_size: tuple[int, int]) -> GaussianMixture:
        """Map tokens and conditioning to the GM over u.

        Args:
            tokens: (B, h·w, D), the output of the final adaLN layer.
            cond: (B, D), the conditioning vector c (detached here for the log-std).
            grid_size: (h, w).

        Returns:
            GaussianMixture with means (B, K, C, h·p, w·p), logweights (B, K, 1, h·p, w·p)
            (log-softmax computed in fp32 whatever the weights dtype) and logstds (B, 1, 1, 1, 1);
            every field fp32, or fp64 when the weights are fp64.
        """
        out_dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        k, c = self.num_gaussians, self.out_channels
        image = unpatchify(self.proj(tokens), grid_size, self.patch_size).to(out_dtype)
        b, _, height, width = image.shape
        means = image[:, : k * c].reshape(b, k, c, height, width)
        logweights = image[:, k * c :].reshape(b, k, 1, height, width).log_softmax(dim=1)
        if self.logstd_mlp is None:
            logstds = torch.full((b, 1, 1, 1, 1), float(self.constant_logstd), dtype=out_dtype)
            logstds = logstds.to(tokens.device)
        else:
            logstds = self.logstd_mlp(cond.detach()).to(out_dtype).reshape(b, 1, 1, 1, 1)
        return GaussianMixture(means, logweights, logstds)
