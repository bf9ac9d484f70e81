"""The toy GMFlow denoiser for 2-D points: sinusoidal features → MLP → GM over u (spec 12.2).

Forward pass, for points x_t ∈ R² at timestep t = 1000·σ:

* time features (256): [cos(t·f_i) | sin(t·f_i)], f_i = exp(−ln(10000)·i/127), i = 0..127, computed
  in fp32 whatever the network dtype (as the Diffusers ``Timesteps(256, flip_sin_to_cos=True,
  downscale_freq_shift=1)`` the official model uses, so fp64 runs reproduce its fp64 outputs);
* position features (256): per coordinate [sin(2π x/P_j) | cos(2π x/P_j)] for 64 periods P_j
  log-spaced from 5e-3 to 50 (first coordinate first), in the input dtype;
* trunk: [time | position] (512) → num_layers × (Linear → SiLU), width hidden_dim;
* heads: means Linear(hidden, 2K) → (B, K, 2, 1, 1); logits Linear(hidden, K) → log-softmax over K;
  log-std Linear(hidden, 1) → (B, 1, 1, 1, 1) (it depends on x_t as well as t), or a constant.

The GM is over the velocity u = ε − x_0 in the GM layout of :mod:`gmflow.gm` (C = 2, H = W = 1).
Our parameter names (``trunk.i``, ``head_means``, ``head_logweights``, ``head_logstds``) differ from
the official ones (``net.{2i}``, ``out_means``, ...); :func:`load_official_toy_mlp` maps them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmflow.errors import CheckpointError
from gmflow.gm import GaussianMixture
from gmflow.gm.mixture import as_scalar_tensor

__all__ = [
    "GMMLP2D",
    "SigmaDenoiser",
    "timestep_features",
    "position_features",
    "official_key_map",
    "load_official_toy_mlp",
]

NUM_TIMESTEPS = 1000  # the network sees timestep = 1000·σ (official weights expect that scale)
_MAX_PERIOD = 10000.0  # base of the sinusoidal time features (Diffusers default)


def timestep_features(timestep: Tensor, dim: int = 256) -> Tensor:
    """Sinusoidal time features [cos(t f_i) | sin(t f_i)], f_i = exp(−ln(10⁴)·i/(dim/2 − 1)).

    Always computed in fp32 (the reference does the same in fp64 mode).

    Args:
        timestep: (B,) timesteps in [0, 1000].
        dim: number of features (even).

    Returns:
        (B, dim) fp32.
    """
    half = dim // 2
    exponent = -math.log(_MAX_PERIOD) * torch.arange(
        half, dtype=torch.float32, device=timestep.device
    )
    freqs = torch.exp(exponent / (half - 1))  # (dim/2,)
    args = timestep.float()[:, None] * freqs[None, :]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def position_features(x: Tensor, periods: Tensor, out: Tensor | None = None) -> Tensor:
    """Per-coordinate Fourier features [sin(2π x_c/P) | cos(2π x_c/P)], first coordinate first.

    Args:
        x: (B, 2) points.
        periods: (P,) periods, in the dtype of ``x``.
        out: optional (B, 4P) tensor (a view with unit column stride is fine) to write into.

    Returns:
        (B, 4P) in the dtype of ``x`` (``out`` when given).
    """
    num = periods.shape[0]
    args = x[:, :, None] * (2 * math.pi / periods)  # (B, 2, P)
    if out is None:
        out = torch.empty(x.shape[0], 4 * num, dtype=x.dtype, device=x.device)
    blocks = out.view(x.shape[0], 2, 2 * num)  # (B, 2, 2P): [sin | cos] per coordinate
    torch.sin(args, out=blocks[..., :num])
    torch.cos(args, out=blocks[..., num:])
    return out


class GMMLP2D(nn.Module):
    """Toy MLP that maps (x_t, timestep) to a GM over the velocity u (spec 12.2).

    Args:
        num_gaussians: K, mixture components.
        hidden_dim: width of the trunk.
        num_layers: number of Linear → SiLU blocks in the trunk.
        embed_dim: number of time features (and of position features: embed_dim/4 periods per
            coordinate × sin, cos × 2 coordinates).
        pos_min_period: smallest period of the position features.
        pos_max_period: largest period of the position features.
        constant_logstd: if given, log s is this constant and there is no log-std head (K = 1 with a
            constant std is plain L2 flow matching).
        trunk_dtype: if given (e.g. ``torch.bfloat16``), the trunk's Linear layers run under
            autocast
            in this dtype; features and heads stay in the parameter dtype, so the GM is computed
            in full precision from the trunk's last activations. None: the parameter dtype. The
            attribute can be changed after construction (it holds no weights).
    """

    def __init__(
        self,
        num_gaussians: int = 64,
        hidden_dim: int = 512,
        num_layers: int = 5,
        embed_dim: int = 256,
        pos_min_period: float = 5e-3,
        pos_max_period: float = 50.0,
        constant_logstd: float | None = None,
        trunk_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_gaussians < 1 or hidden_dim < 1 or num_layers < 1 or embed_dim % 4 or embed_dim < 8:
            raise ValueError(
                "GMMLP2D: need num_gaussians >= 1, hidden_dim >= 1, num_layers >= 1 and embed_dim "
                "a multiple of 4 (>= 8); got "
                f"{num_gaussians}, {hidden_dim}, {num_layers}, {embed_dim}"
            )
        self.num_gaussians = num_gaussians
        self.embed_dim = embed_dim
        self.pos_min_period = pos_min_period
        self.pos_max_period = pos_max_period
        self.constant_logstd = constant_logstd
        self.trunk_dtype = trunk_dtype
        in_dims = [2 * embed_dim] + [hidden_dim] * (num_layers - 1)
        self.trunk = nn.ModuleList(nn.Linear(d, hidden_dim) for d in in_dims)
        self.head_means = nn.Linear(hidden_dim, 2 * num_gaussians)
        self.head_logweights = nn.Linear(hidden_dim, num_gaussians)
        self.head_logstds = nn.Linear(hidden_dim, 1) if constant_logstd is None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Apply the reference init (spec 12.2, oracle 9).

        Kaiming-normal (fan-in, ReLU gain) weights and zero biases; zero logit and log-std weights,
        so that at init the mixture weights are uniform and s = 1.
        """
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.head_logweights.weight)
        if self.head_logstds is not None:
            nn.init.zeros_(self.head_logstds.weight)

    def periods(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(embed_dim/4,) periods log-spaced from pos_min_period to pos_max_period, in ``dtype``.

        Computed as the reference does (natural-log ``torch.logspace``; the features then use
        x·(2π/P)), which makes fp32 outputs bit-identical to the reference's: with periods as small
        as 5e-3 the arguments reach ~5000 rad, where fp32 rounding differences of the arguments
        would change the output by ~1e-4.
        """
        return torch.logspace(
            math.log(self.pos_min_period),
            math.log(self.pos_max_period),
            self.embed_dim // 4,
            base=math.e,
            dtype=dtype,
            device=device,
        )

    def forward(self, x_t: Tensor, timestep: Tensor | float) -> GaussianMixture:
        """Predict the GM over u at (x_t, timestep).

        Args:
            x_t: (B, 2, 1, 1) or flat (B, 2) points (the flat call is the reference trainer's).
            timestep: (B,) or scalar, t = 1000·σ in [0, 1000].

        Returns:
            GM with means (B, K, 2, 1, 1), logweights (B, K, 1, 1, 1) (log-softmax over K) and
            logstds (B, 1, 1, 1, 1), in the parameter dtype, for both input layouts.
        """
        if x_t.dim() == 4 and x_t.shape[1:] == (2, 1, 1):
            x = x_t.flatten(1)  # (B, 2)
        elif x_t.dim() == 2 and x_t.shape[1] == 2:
            x = x_t
        else:
            raise ValueError(
                f"GMMLP2D: expected x_t of shape (B, 2, 1, 1) or (B, 2), got {tuple(x_t.shape)}"
            )
        batch = x.shape[0]
        weight = self.trunk[0].weight
        x = x.to(weight.dtype)
        timestep = as_scalar_tensor(timestep, device=x.device).reshape(-1)
        shared_t = timestep.numel() == 1 or bool((timestep == timestep[0]).all())
        t_feat = timestep_features(timestep[:1] if shared_t else timestep, self.embed_dim)
        # [time | position] written into one buffer (no concatenation copies); with one shared t
        # only the position block is needed
        feats = torch.empty(
            batch, self.embed_dim * (1 if shared_t else 2), dtype=x.dtype, device=x.device
        )
        position_features(x, self.periods(x.dtype, x.device), out=feats[:, -self.embed_dim :])
        if not shared_t:
            feats[:, : self.embed_dim] = t_feat
        t_feat = t_feat.to(x.dtype)
        autocast = self.trunk_dtype is not None and self.trunk_dtype != x.dtype
        first = self.trunk[0]
        with torch.autocast(x.device.type, dtype=self.trunk_dtype or x.dtype, enabled=autocast):
            if shared_t:
                # one t for the whole batch (sampling): split the first layer,
                # W [t; p] = W_t t + W_p p, and apply W_t once instead of materialising the
                # (B, 2·embed_dim) input
                bias = F.linear(
                    t_feat, first.weight[:, : self.embed_dim], first.bias
                )  # (1, hidden)
                h = F.linear(feats, first.weight[:, self.embed_dim :]) + bias  # (B, hidden)
            else:
                h = first(feats)  # (B, hidden)
            h = F.silu(h)
            for layer in list(self.trunk)[1:]:
                h = F.silu(layer(h))
        h = h.to(x.dtype)  # the heads run in the parameter dtype
        k = self.num_gaussians
        means = self.head_means(h).reshape(batch, k, 2, 1, 1)
        logweights = torch.log_softmax(self.head_logweights(h), dim=-1).reshape(batch, k, 1, 1, 1)
        if self.head_logstds is None:
            logstds = torch.full(
                (batch, 1, 1, 1, 1), float(self.constant_logstd), dtype=h.dtype, device=h.device
            )
        else:
            logstds = self.head_logstds(h).reshape(batch, 1, 1, 1, 1)
        return GaussianMixture(means, logweights, logstds)

    def denoise(
        self, x_t: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
    ) -> GaussianMixture:
        """Denoiser interface of :func:`gmflow.flow.sample`: the GM over u at noise level σ.

        Args:
            x_t: (B, 2, 1, 1) points.
            sigma: (B,) or scalar noise levels in [0, 1]; the network sees 1000·σ.
            class_labels: ignored (the toy is unconditional).

        Returns:
            GM over u as in :meth:`forward`, cast to the dtype of ``x_t``.
        """
        del class_labels
        sigma = as_scalar_tensor(sigma, device=x_t.device)
        gm = self(x_t, sigma * NUM_TIMESTEPS)
        return gm.to(x_t.dtype) if gm.dtype != x_t.dtype and x_t.is_floating_point() else gm


class SigmaDenoiser(nn.Module):
    """A module whose call is the σ-based denoiser: ``denoiser(x_t, sigma, class_labels)``.

    Wraps a :class:`GMMLP2D` (kept as ``.net``) for :func:`gmflow.flow.sample`.
    """

    def __init__(self, net: GMMLP2D) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, x_t: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
    ) -> GaussianMixture:
        """The GM over u at (x_t (B, 2, 1, 1), σ (B,) or scalar); see :meth:`GMMLP2D.denoise`."""
        return self.net.denoise(x_t, sigma, class_labels)


# ---- the official checkpoint layout ----

_OFFICIAL_CONFIG_KEYS = {
    "num_gaussians",
    "pos_min_period",
    "pos_max_period",
    "embed_dim",
    "hidden_dim",
    "constant_logstd",
    "num_layers",
}


def official_key_map(num_layers: int, has_logstd_head: bool = True) -> dict[str, str]:
    """Official ``GMFlowMLP2DDenoiser`` parameter name → our :class:`GMMLP2D` name.

    The official trunk is an ``nn.Sequential`` of Linear/SiLU pairs, so its Linear layers sit at the
    even indices ``net.0, net.2, ...``.
    """
    mapping: dict[str, str] = {}
    for i in range(num_layers):
        for p in ("weight", "bias"):
            mapping[f"net.{2 * i}.{p}"] = f"trunk.{i}.{p}"
    heads = ["means", "logweights"] + (["logstds"] if has_logstd_head else [])
    for head in heads:
        for p in ("weight", "bias"):
            mapping[f"out_{head}.{p}"] = f"head_{head}.{p}"
    return mapping


def load_official_toy_mlp(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> SigmaDenoiser:
    """Load an official toy checkpoint folder (``config.json`` + ``model.safetensors``).

    Only safetensors are read (plain tensors, no pickle), through :func:`official_key_map`.

    Args:
        folder: directory holding ``config.json`` and ``model.safetensors``.
        dtype: parameter dtype of the returned model.
        device: device of the returned model.

    Returns:
        A :class:`SigmaDenoiser` in eval mode (``.net`` is the :class:`GMMLP2D`).

    Raises:
        CheckpointError: the folder or a file is missing, the config has unknown keys, or the
            weights miss keys, have extra keys or have the wrong shapes.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(
                f"official toy checkpoint: '{path}' not found; the folder must hold config.json "
                "and model.safetensors (the official GMFlowMLP2DDenoiser layout)"
            )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{config_path}' is not valid JSON: {err}") from None
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(kwargs) - _OFFICIAL_CONFIG_KEYS)
    if unknown:
        raise CheckpointError(
            f"'{config_path}': unknown keys {unknown}; valid keys: {sorted(_OFFICIAL_CONFIG_KEYS)}"
        )
    net = GMMLP2D(**kwargs)
    state = load_file(str(weights_path))
    mapping = official_key_map(len(net.trunk), has_logstd_head=net.head_logstds is not None)
    missing = [k for k in mapping if k not in state]
    extra = sorted(set(state) - set(mapping))
    if missing or extra:
        raise CheckpointError(
            f"'{weights_path}' does not match the config in '{config_path}': "
            f"missing keys {missing}, unexpected keys {extra}"
        )
    ours = net.state_dict()
    converted = {}
    for official, name in mapping.items():
        if state[official].shape != ours[name].shape:
            raise CheckpointError(
                f"'{weights_path}': '{official}' has shape {tuple(state[official].shape)}, "
                f"expected {tuple(ours[name].shape)} for the config in '{config_path}'"
            )
        converted[name] = state[official]
    net.load_state_dict(converted)
    return SigmaDenoiser(net.to(device=device, dtype=dtype)).eval()
