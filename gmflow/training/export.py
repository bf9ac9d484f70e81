"""``gmflow export RUN_DIR OUT_DIR``: a training run's EMA weights as a ``GMDiTPipeline`` folder.

The folder loads with ``GMDiTPipeline.from_pretrained(OUT_DIR)`` and ``gmflow sample --pretrained
OUT_DIR``. The transformer is saved with the official config keys (so the folder looks like the
released pipeline), the spectrum net when the run trained one, the VAE of a latent dataset, and
the class names of the dataset manifest.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from gmflow.errors import CheckpointError, ConfigError
from gmflow.run_config import ModelConfig, RunConfig

__all__ = ["export_pipeline", "official_transformer_config"]

logger = logging.getLogger(__name__)


def official_transformer_config(m: ModelConfig) -> dict:
    """The official ``transformer/config.json`` keys describing our model config."""
    from gmflow.models.gmdit import GMDIT_PRESETS

    if m.arch != "gmdit":
        raise ConfigError(
            f"model.arch={m.arch!r}: only GM-DiT runs export to a GMDiTPipeline (the 2-D toy has "
            "no image pipeline)"
        )
    size = (
        {
            "hidden_dim": m.hidden_size,
            "depth": m.depth,
            "num_heads": m.num_heads,
            "patch_size": m.patch_size,
        }
        if m.preset == "custom"
        else GMDIT_PRESETS[m.preset]
    )
    return {
        "num_gaussians": m.num_gaussians,
        "logstd_inner_dim": m.logstd_inner_dim,
        "gm_num_logstd_layers": 2,
        "num_attention_heads": size["num_heads"],
        "attention_head_dim": size["hidden_dim"] // size["num_heads"],
        "in_channels": m.in_channels,
        "num_layers": size["depth"],
        "sample_size": m.sample_size,
        "patch_size": size["patch_size"],
        "num_embeds_ada_norm": m.num_classes,
        "constant_logstd": m.constant_logstd,
    }


def _dataset_info(cfg: RunConfig) -> tuple[str | None, dict[int, str] | None]:
    """(VAE id of a latent dataset or None, class names) from the run's data manifest."""
    if cfg.data.kind != "shards" or not cfg.data.path:
        return None, None
    from gmflow.data.manifest import read_manifest

    try:
        manifest = read_manifest(cfg.data.path)
    except Exception as err:  # noqa: BLE001 - the data may live elsewhere; export still works
        logger.warning("could not read the data manifest at %s (%s)", cfg.data.path, err)
        return None, None
    encoder = manifest.encoder if manifest.mode == "latent" else None
    return encoder, dict(manifest.classes) or None


def export_pipeline(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    vae: str | None = "auto",
    use_ema: bool = True,
    variant: str | None = None,
    step: int | None = None,
) -> Path:
    """Write the (EMA) weights of one of the run's checkpoints as a pipeline folder.

    Args:
        run_dir: the training run folder (config.yaml + checkpoints/).
        out_dir: where to write the pipeline (model_index.json, transformer/, ...).
        vae: "auto" (the VAE named by a latent dataset's manifest; none for pixel data), "none",
            or a hub id / local folder of a diffusers AutoencoderKL.
        use_ema: export the EMA weights (default) or the raw training weights.
        variant: e.g. "bf16" to also cast and save the weights as that variant.
        step: the checkpoint's training step; None = the latest.

    Returns:
        The pipeline folder.

    Raises:
        CheckpointError: the run has no checkpoint, or the VAE cannot be loaded.
    """
    from gmflow.pipelines import FlowEulerODEScheduler, GMDiTPipeline
    from gmflow.pipelines.models import GMDiTTransformer2DModel, SpectrumMLPModel
    from gmflow.training.build import load_run

    cfg, denoiser, spectrum_net = load_run(run_dir, use_ema=use_ema, step=step)
    m = cfg.model
    transformer = GMDiTTransformer2DModel(**official_transformer_config(m))
    transformer.load_state_dict(denoiser.state_dict())
    spectrum = None
    if spectrum_net is not None:
        spectrum = SpectrumMLPModel(
            base_size=(m.in_channels, m.sample_size, m.sample_size), layers=tuple(m.spectrum_layers)
        )
        spectrum.load_state_dict(spectrum_net.state_dict())
    encoder, classes = _dataset_info(cfg)
    vae_spec = encoder if vae == "auto" else (None if vae in (None, "none") else vae)
    vae_model = None
    if vae_spec is not None:
        from gmflow.models.vae import load_vae

        try:
            vae_model = load_vae(vae_spec).model
        except Exception as err:
            raise CheckpointError(
                f"export: the VAE '{vae_spec}' could not be loaded ({err}); pass --vae PATH to a "
                "local AutoencoderKL folder, or --vae none to export without one"
            ) from err
    id2label = {int(k): str(v) for k, v in classes.items()} if classes else None
    pipe = GMDiTPipeline(
        transformer=transformer,
        scheduler=FlowEulerODEScheduler(num_train_timesteps=1000, shift=cfg.loss.shift),
        spectrum_net=spectrum,
        vae=vae_model,
        id2label=id2label,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    if variant is not None:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(variant)
        if dtype is None:
            raise ConfigError(f"export: variant must be 'bf16' or 'fp16', got {variant!r}")
        pipe.to(dtype).save_pretrained(out, safe_serialization=True, variant=variant)
    return out
