"""Build the networks and the training objective of a recipe; load a run folder back.

The trainable module is a :class:`GMFlowObjective` holding the denoiser (``.denoiser``) and the
optional spectrum net (``.spectrum_net``); its ``state_dict`` keys are prefixed accordingly in
checkpoints (``denoiser.*``, ``spectrum_net.*``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from gmflow.config import load_recipe
from gmflow.errors import CheckpointError
from gmflow.flow import sample_timesteps, transition_pair, u_to_x0
from gmflow.flow.spectral import spectral_loss
from gmflow.gm import GaussianMixture, gm_to_iso_gaussian
from gmflow.losses import transition_nll
from gmflow.run_config import LossConfig, ModelConfig, RunConfig

__all__ = ["build_denoiser", "build_spectrum_net", "GMFlowObjective", "build_objective", "load_run"]


def build_denoiser(cfg: ModelConfig) -> nn.Module:
    """The denoiser of a recipe: ``denoiser(x_t, sigma, class_labels) -> GaussianMixture``."""
    match cfg.arch:
        case "gmdit":
            from gmflow.models.gmdit import build_gmdit

            kwargs = {
                "logstd_inner_dim": cfg.logstd_inner_dim,
                "constant_logstd": cfg.constant_logstd,
                "use_checkpointing": cfg.use_checkpointing,
            }
            if cfg.preset == "custom":
                kwargs |= {
                    "hidden_dim": cfg.hidden_size,
                    "depth": cfg.depth,
                    "num_heads": cfg.num_heads,
                    "patch_size": cfg.patch_size,
                }
                preset = "S/2"
            else:
                preset = cfg.preset
            return build_gmdit(
                preset,
                num_gaussians=cfg.num_gaussians,
                in_channels=cfg.in_channels,
                sample_size=cfg.sample_size,
                num_classes=cfg.num_classes,
                **kwargs,
            )
        case "mlp2d":
            from gmflow.models.mlp2d import GMMLP2D, SigmaDenoiser

            return SigmaDenoiser(
                GMMLP2D(
                    num_gaussians=cfg.num_gaussians,
                    hidden_dim=cfg.hidden_dim,
                    num_layers=cfg.num_layers,
                )
            )
    raise ValueError(f"model.arch={cfg.arch!r}; expected one of 'gmdit', 'mlp2d'")


def build_spectrum_net(cfg: ModelConfig) -> nn.Module | None:
    """The spectrum MLP for spectral GM-SDE sampling (spec 9.1), or None."""
    if not cfg.use_spectrum_net:
        return None
    from gmflow.models.spectrum import SpectrumMLP

    return SpectrumMLP(
        base_size=(cfg.in_channels, cfg.sample_size, cfg.sample_size),
        layers=tuple(cfg.spectrum_layers),
    )


class GMFlowObjective(nn.Module):
    """Denoiser + spectrum net; ``forward(x0, labels)`` is one training loss evaluation (spec 4.4b).

    Returns ``{"loss": scalar, "stats": {name: float}}``; stats holds the transition loss, the
    spectral loss, the mean component std ``gm_std`` and mixture variance ``gm_var`` (spec 4.3)
    of the u-space GM, and the loss per σ quartile present in the batch. The losses run with
    autocast disabled: GM maths stays fp32 under a bf16 trainer.
    """

    def __init__(
        self, denoiser: nn.Module, spectrum_net: nn.Module | None, loss: LossConfig
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.spectrum_net = spectrum_net
        self.loss_cfg = loss

    def forward(self, x0: Tensor, labels: Tensor) -> dict:
        cfg = self.loss_cfg
        x0 = x0.float()
        sigma_high = sample_timesteps(
            x0.shape[0],
            kind=cfg.timesteps,
            shift=cfg.shift,
            mean=cfg.logit_mean,
            std=cfg.logit_std,
            device=x0.device,
        )
        x_low, x_high, sigma_low = transition_pair(x0, sigma_high, cfg.trans_ratio)
        gm_u = self.denoiser(x_high, sigma_high, labels)
        # GM maths in fp32 even when the trainer runs the network under bf16 autocast (spec 2.3,
        # 17.3): autocast would run the KR map's einsums of the spectral loss in bf16
        with torch.autocast(x0.device.type, enabled=False):
            return self._losses(x0, x_low, x_high, sigma_low, sigma_high, gm_u)

    def _losses(
        self,
        x0: Tensor,
        x_low: Tensor,
        x_high: Tensor,
        sigma_low: Tensor,
        sigma_high: Tensor,
        gm_u: GaussianMixture,
    ) -> dict:
        cfg = self.loss_cfg
        nll = transition_nll(gm_u, x_low, x_high, sigma_low, sigma_high)  # (B, H, W)
        # = gmflow.losses.transition_loss per sample: scale · mean_{H,W}(ℓ_p / C)
        per_sample = cfg.loss_scale * nll.mean(dim=(-2, -1)) / x0.shape[1]  # (B,)
        loss = per_sample.mean()
        stats = {"loss_trans": float(loss.detach())}
        if self.spectrum_net is not None:
            with torch.no_grad():
                iso_x0 = gm_to_iso_gaussian(u_to_x0(gm_u.detach(), x_high, sigma_high))
            log_spectrum = self.spectrum_net(iso_x0)
            loss_spec = spectral_loss(
                gm_u, x0, x_high, sigma_high, log_spectrum, weight=cfg.spectral_weight
            )
            loss = loss + loss_spec
            stats["loss_spec"] = float(loss_spec.detach())
        with torch.no_grad():
            quartile = (sigma_high * 4).long().clamp_max(3)
            for q in range(4):
                mask = quartile == q
                if bool(mask.any()):
                    stats[f"loss_q{q}"] = float(per_sample[mask].mean())
            stats["gm_std"] = float(gm_u.logstds.exp().mean())  # s, the component std
            stats["gm_var"] = float(gm_to_iso_gaussian(gm_u).var.mean())  # Σ A (‖μ − m‖²/C + s²)
        stats["loss"] = float(loss.detach())
        return {"loss": loss, "stats": stats}


def build_objective(cfg: RunConfig) -> GMFlowObjective:
    """The trainable module of a recipe (fresh initialisation)."""
    return GMFlowObjective(build_denoiser(cfg.model), build_spectrum_net(cfg.model), cfg.loss)


def load_run(
    run_dir: str | Path,
    *,
    use_ema: bool = True,
    map_location: str = "cpu",
    step: int | None = None,
) -> tuple[RunConfig, nn.Module, nn.Module | None]:
    """Load a training run folder: its config and the (EMA) weights of one checkpoint.

    Args:
        run_dir: the folder given to ``gmflow train``.
        use_ema: the EMA weights (else the raw ones).
        map_location: where the weights are loaded.
        step: the checkpoint's training step; None = the latest complete one.

    Returns:
        (config, denoiser, spectrum_net or None), in eval mode on ``map_location``.

    Raises:
        CheckpointError: no config.yaml, no (such) checkpoint, or weights that do not fit the
            config.
    """
    from gmflow.training.checkpoint import list_checkpoints, load_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(
            f"run folder '{run_dir}' has no config.yaml; pass the folder given to `gmflow train`"
        )
    cfg = load_recipe(run_dir / "config.yaml", RunConfig)
    checkpoints = dict(list_checkpoints(run_dir))
    if not checkpoints:
        raise CheckpointError(
            f"run folder '{run_dir}' has no complete checkpoint under checkpoints/"
        )
    if step is not None and step not in checkpoints:
        raise CheckpointError(
            f"run folder '{run_dir}' has no complete checkpoint at step {step}; its checkpoints "
            f"are at steps {sorted(checkpoints)}"
        )
    chosen = checkpoints[max(checkpoints) if step is None else step]
    state = load_checkpoint(chosen, map_location=map_location)
    weights = state["ema"] if use_ema and state["ema"] is not None else state["model"]
    objective = build_objective(cfg)
    missing, unexpected = objective.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {chosen} does not match config.yaml: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    objective.eval()
    return cfg, objective.denoiser, objective.spectrum_net
