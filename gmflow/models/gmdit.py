"""GM-DiT: a DiT trunk with adaLN-Zero blocks and the GM output head (spec 5.1, 2.2, 2.3).

    x_t (B, C, H, W) ──Conv2d(p, stride p)──> tokens (B, N = H/p · W/p, D) + 2-D sin-cos positions
    σ (B,) ──t = 1000·σ──> 256 sinusoidal features [cos | sin] (fp32) ──Linear─SiLU─Linear──┐
    y (B,) ──Embedding(num_classes + 1, D) (row num_classes = null class)─────────────────(+)──> c
    tokens ──[adaLN-Zero block(c)] × depth──> LN·(1 + scale) + shift ──GMHead──> GM over u

Each block, with (shift1, scale1, gate1, shift2, scale2, gate2) = Linear_{D→6D}(SiLU(c)):
    h ← h + gate1 · Attn(LN1(h)·(1 + scale1) + shift1)      LN1: eps 1e-6, no affine
    h ← h + gate2 · MLP(LN2(h)·(1 + scale2) + shift2)       LN2: eps ``norm_eps`` (1e-5), no affine
MLP = Linear(D, 4D) → GELU(tanh) → Linear(4D, D); attention has biases and no qk-norm. The
conditioning c is computed once and shared by every block and the final layer.

The module is written from the spec with its own parameter names; official checkpoints load
through the key map in :mod:`gmflow.models.convert`. ``GMDIT_PRESETS`` gives the DiT sizes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gmflow.gm import GaussianMixture
from gmflow.gm.mixture import as_scalar_tensor
from gmflow.models.gm_head import GMHead

__all__ = [
    "GMDiT",
    "GMDIT_PRESETS",
    "build_gmdit",
    "timestep_features",
    "sincos_pos_embed_2d",
    "NUM_TRAIN_TIMESTEPS",
]

NUM_TRAIN_TIMESTEPS = 1000
"""The network sees timestep = 1000·σ (the scale the official weights were trained with)."""

TIMESTEP_FEATURES = 256

GMDIT_PRESETS: dict[str, dict[str, int]] = {
    "S/2": {"hidden_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 2},
    "B/2": {"hidden_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 2},
    "L/2": {"hidden_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 2},
    "XL/2": {"hidden_dim": 1152, "depth": 28, "num_heads": 16, "patch_size": 2},
}
"""DiT trunk sizes (Peebles & Xie); the released GMFlow model is XL/2 with K = 8."""


def timestep_features(timestep: Tensor, dim: int = TIMESTEP_FEATURES) -> Tensor:
    """Sinusoidal timestep features [cos(t·f_i) | sin(t·f_i)], f_i = exp(−ln(10⁴)·i/(dim/2)).

    Always computed in fp32 (as the official model does, even in fp64 mode), so that fp64 runs
    reproduce the official outputs to ~1e-12 rather than ~1e-7.

    Args:
        timestep: (B,) continuous timesteps t = 1000·σ ∈ [0, 1000].
        dim: number of features (even).

    Returns:
        (B, dim) float32.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device)
    freqs = torch.exp(exponent / half)
    args = timestep.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[sin(pos·ω_i) | cos(pos·ω_i)], ω_i = 10000^(−i/(dim/2)), i < dim/2; pos (N,) -> (N, dim)."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: tuple[int, int], base_size: int) -> Tensor:
    """Fixed 2-D sin-cos position table of the DiT/MAE convention, (1, h·w, dim) float32.

    Token n = row·w + col gets [sincos_1d(dim/2, col') | sincos_1d(dim/2, row')] (column first),
    with row' = row·base_size/h and col' = col·base_size/w (so a grid of the training size
    ``base_size`` uses integer positions). Computed in fp64 and rounded to fp32, like the official
    table, whose rounding fp64 runs inherit.
    """
    if dim % 4 != 0:
        raise ValueError(f"sincos_pos_embed_2d: hidden size must be divisible by 4, got {dim}")
    h, w = grid_size
    rows = torch.arange(h, dtype=torch.float64) / (h / base_size)
    cols = torch.arange(w, dtype=torch.float64) / (w / base_size)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each
    emb = torch.cat(
        [_sincos_1d(dim // 2, grid_cols.reshape(-1)), _sincos_1d(dim // 2, grid_rows.reshape(-1))],
        dim=1,
    )
    return emb.float().unsqueeze(0)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and SDPA (or explicit softmax)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(
                f"SelfAttention: hidden size {dim} is not divisible by {num_heads} heads"
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.use_sdpa = True

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (B, heads, N, hd)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (spec 5.1); the modulation Linear is zero at init."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float) -> None:
        super().__init__()
        self.modulation = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )

    def forward(self, h: Tensor, cond_act: Tensor) -> Tensor:
        """h (B, N, D); cond_act = SiLU(c) (B, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond_act)[:, None].chunk(
            6, dim=-1
        )
        h = h + gate1 * self.attn(_modulate(self.norm1(h), shift1, scale1))
        return h + gate2 * self.mlp(_modulate(self.norm2(h), shift2, scale2))


class GMDiT(nn.Module):
    """DiT trunk + GM head; ``model(x_t, sigma, class_labels)`` is a GM denoiser over u.

    Args:
        in_channels: C of x_t (4 for SD-VAE latents; any count in pixel space).
        sample_size: the training spatial size H = W; fixes the position table (other sizes
            divisible by ``patch_size`` work with a rescaled table).
        patch_size: p.
        hidden_dim: D.
        depth: number of blocks.
        num_heads: attention heads (D must be divisible by it).
        mlp_ratio: MLP width / D.
        num_gaussians: K.
        num_classes: number of real classes; the embedding table has one more row, the null
            class ``num_classes`` (0 gives an unconditional model).
        logstd_inner_dim, num_logstd_layers, constant_logstd: the log-std MLP (see GMHead).
        norm_eps: eps of the LayerNorm before the MLP (the official ``norm_eps``, 1e-5); the one
            before attention and the final one use 1e-6.
        use_checkpointing: recompute block activations in the backward pass (training only).
    """

    def __init__(
        self,
        *,
        in_channels: int = 4,
        sample_size: int = 32,
        patch_size: int = 2,
        hidden_dim: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_gaussians: int = 8,
        num_classes: int = 1000,
        logstd_inner_dim: int = 1024,
        num_logstd_layers: int = 2,
        constant_logstd: float | None = None,
        norm_eps: float = 1e-5,
        use_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if sample_size % patch_size != 0:
            raise ValueError(
                f"GMDiT: sample_size {sample_size} is not divisible by patch_size {patch_size}"
            )
        self.in_channels = in_channels
        self.sample_size = sample_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.num_classes = num_classes
        self.num_gaussians = num_gaussians
        self.use_checkpointing = use_checkpointing
        self.patch_embed = nn.Conv2d(in_channels, hidden_dim, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", torch.empty(0), persistent=False)
        self.reset_buffers()
        self.time_embed = nn.Sequential(
            nn.Linear(TIMESTEP_FEATURES, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.class_embed = nn.Embedding(num_classes + 1, hidden_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_dim, num_heads, mlp_ratio, norm_eps) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(hidden_dim, eps=1e-6, elementwise_affine=False)
        self.final_modulation = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.head = GMHead(
            hidden_dim,
            in_channels,
            patch_size,
            num_gaussians,
            logstd_inner_dim=logstd_inner_dim,
            num_logstd_layers=num_logstd_layers,
            constant_logstd=constant_logstd,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Spec 5.1 init: Xavier-uniform Linears (zero bias), N(0, 0.02) class table, Xavier patch
        conv on its flattened view, zero adaLN-Zero and final modulations, head per spec 2.2."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.hidden_dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_modulation.bias)
        self.head.reset_parameters()

    def reset_buffers(self) -> None:
        """(Re)compute the fixed position table, e.g. after building on the meta device."""
        grid = self.sample_size // self.patch_size
        table = sincos_pos_embed_2d(self.hidden_dim, (grid, grid), grid)
        self.pos_embed = table.to(device=self.patch_embed.weight.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    def set_attention_backend(self, use_sdpa: bool) -> None:
        """Use ``F.scaled_dot_product_attention`` (default) or the explicit softmax(QKᵀ/√d)V."""
        for block in self.blocks:
            block.attn.use_sdpa = use_sdpa

    def embed_condition(self, timestep: Tensor, class_labels: Tensor | None) -> Tensor:
        """c = TimeEmb(timestep) + ClassEmb(class_labels), (B, D) in the weights dtype.

        Args:
            timestep: (B,) t = 1000·σ.
            class_labels: (B,) int in [0, num_classes]; ``num_classes`` (or None) is the null class.
        """
        b = timestep.shape[0]
        if class_labels is None:
            class_labels = torch.full(
                (b,), self.num_classes, dtype=torch.long, device=timestep.device
            )
        class_labels = class_labels.reshape(-1).long()
        if class_labels.device.type == "cpu" and class_labels.numel() > 0:
            lo, hi = int(class_labels.min()), int(class_labels.max())
            if lo < 0 or hi > self.num_classes:
                raise ValueError(
                    f"GMDiT: class labels must lie in [0, {self.num_classes}] "
                    f"({self.num_classes} = null class), got values in [{lo}, {hi}]"
                )
        features = timestep_features(timestep).to(self.dtype)
        return self.time_embed(features) + self.class_embed(class_labels)

    def _pos_embed(self, grid_size: tuple[int, int], like: Tensor) -> Tensor:
        base = self.sample_size // self.patch_size
        if grid_size == (base, base):
            table = self.pos_embed
        else:
            table = sincos_pos_embed_2d(self.hidden_dim, grid_size, base).to(like.device)
        return table.to(like.dtype)

    def forward_timestep(
        self, x_t: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None
    ) -> GaussianMixture:
        """Evaluate with the official timestep scale t = 1000·σ (see :meth:`forward`)."""
        if x_t.dim() != 4 or x_t.shape[1] != self.in_channels:
            raise ValueError(
                f"GMDiT: expected x_t of shape (B, C={self.in_channels}, H, W), "
                f"got {tuple(x_t.shape)}"
            )
        b, _, height, width = x_t.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"GMDiT: spatial size {height}x{width} is not divisible by patch size {p}"
            )
        timestep = as_scalar_tensor(timestep, device=x_t.device).reshape(-1).expand(b)
        cond = self.embed_condition(timestep, class_labels)  # (B, D)
        cond_act = F.silu(cond)
        grid = (height // p, width // p)
        h = self.patch_embed(x_t.to(self.dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        h = h + self._pos_embed(grid, h)
        for block in self.blocks:
            if self.use_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, cond_act, use_reentrant=False)
            else:
                h = block(h, cond_act)
        shift, scale = self.final_modulation(cond_act)[:, None].chunk(2, dim=-1)
        h = _modulate(self.final_norm(h), shift, scale)
        return self.head(h, cond, grid)

    def forward(
        self, x_t: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
    ) -> GaussianMixture:
        """Predict the per-pixel GM over u = noise − x_0 given x_t = (1 − σ)·x_0 + σ·noise.

        Args:
            x_t: (B, C, H, W), any float dtype (cast to the weights dtype).
            sigma: noise level σ ∈ [0, 1], a float or (B,) (any shape with B or 1 elements).
            class_labels: (B,) ints; ``num_classes`` or None is the null (unconditional) class.

        Returns:
            GaussianMixture over u: means (B, K, C, H, W), logweights (B, K, 1, H, W), logstds
            (B, 1, 1, 1, 1), in fp32 (fp64 when the weights are fp64).
        """
        sigma = as_scalar_tensor(sigma, device=x_t.device)
        return self.forward_timestep(x_t, sigma * NUM_TRAIN_TIMESTEPS, class_labels)


def build_gmdit(
    preset: str,
    num_gaussians: int = 8,
    in_channels: int = 4,
    sample_size: int = 32,
    num_classes: int = 1000,
    **kwargs: Any,
) -> GMDiT:
    """Build a GM-DiT of a DiT size: ``build_gmdit("XL/2", num_gaussians=8)`` is the released model.

    Args:
        preset: one of ``GMDIT_PRESETS`` ("S/2", "B/2", "L/2", "XL/2").
        num_gaussians, in_channels, sample_size, num_classes: see :class:`GMDiT`.
        **kwargs: any other :class:`GMDiT` argument, overriding the preset.
    """
    if preset not in GMDIT_PRESETS:
        raise ValueError(
            f"build_gmdit: unknown preset {preset!r}; expected one of {sorted(GMDIT_PRESETS)}"
        )
    config: dict[str, Any] = {**GMDIT_PRESETS[preset], **kwargs}
    return GMDiT(
        num_gaussians=num_gaussians,
        in_channels=in_channels,
        sample_size=sample_size,
        num_classes=num_classes,
        **config,
    )
