"""The validation sample grid drawn from the EMA model during training."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gmflow.run_config import RunConfig

__all__ = [
    "save_validation_grid",
    "samples_to_grid",
    "load_validation_vae",
    "load_dataset_vae",
]

logger = logging.getLogger(__name__)


def samples_to_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (H', W', 3) uint8 grid (1 channel is shown grey)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x[:, :3]
    n, c, h, w = x.shape
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    grid = torch.zeros(c, nrows * h, ncol * w, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def load_validation_vae(cfg: RunConfig, device: torch.device) -> Any:
    """The VAE that decodes latent validation grids, or None to show latent channels (spec 5.3).

    ``validation.vae``: "none" -> None; "auto" -> the encoder named by the shards' manifest.json
    for latent data, with a warning and None when it cannot be loaded (offline, no cache), so a
    run never stops for a preview; a hub id or folder -> that VAE, and a CheckpointError before
    step 0 if it cannot be loaded.
    """
    if not cfg.validation.every:
        return None
    return load_dataset_vae(cfg, "validation.vae", device, required=False)


def load_dataset_vae(cfg: RunConfig, key: str, device: torch.device, *, required: bool) -> Any:
    """The decoder of a run's latents named by the recipe key ``key`` (e.g. "validation.vae"):
    "none", "auto" (the dataset manifest's encoder) or a VAE hub id / folder; None for pixel
    data, the 2-D toy or "none".

    With ``required``, an "auto" VAE that cannot be loaded is a CheckpointError; otherwise a
    warning and None.
    """
    section, field_name = key.split(".")
    spec = getattr(getattr(cfg, section), field_name)
    if spec == "none" or cfg.model.arch != "gmdit":
        return None
    from gmflow.models.vae import load_vae

    if spec != "auto":
        return load_vae(spec, device=device)
    if cfg.data.kind != "shards":
        return None
    from gmflow.data.manifest import read_manifest
    from gmflow.errors import CheckpointError, GMFlowError

    try:
        manifest = read_manifest(cfg.data.path)
        if manifest.mode != "latent" or not manifest.encoder:
            return None
        return load_vae(manifest.encoder, device=device)
    except (GMFlowError, ImportError, OSError) as err:
        if required:
            raise CheckpointError(
                f"the dataset's VAE cannot be loaded ({err}); set {key} to a local VAE folder (or "
                "a hub id when online) that decodes these latents"
            ) from err
        logger.warning(
            "validation grids will show latent channels: the dataset's VAE cannot be loaded (%s); "
            "set %s to a local VAE folder to decode them",
            err,
            key,
        )
        return None


@torch.no_grad()
def save_validation_grid(
    cfg: RunConfig,
    objective: nn.Module,
    ema: Any,
    run_dir: Path,
    step: int,
    device: torch.device,
    metrics_log: Any,
    vae: Any = None,
) -> Path:
    """Sample the EMA model with the recipe's validation solver and save ``samples/step-N.png``.

    Pixel-space models are shown directly. Latent models are decoded with ``vae`` (see
    :func:`load_validation_vae`); without one, the grid shows their first three latent channels.
    """
    from PIL import Image

    from gmflow.flow import sample

    model = copy.deepcopy(objective).eval()
    if ema is not None:
        ema.load_into(model)
    v, m = cfg.validation, cfg.model
    gen = torch.Generator(device="cpu").manual_seed(cfg.train.seed)  # starting noise
    loop_gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)  # in-loop draws
    out_dir = Path(run_dir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step-{step:08d}.png"
    if m.arch == "mlp2d":
        noise = torch.randn(20_000, 2, 1, 1, generator=gen).to(device)
        x = sample(model.denoiser, noise, solver="gm-sde", num_steps=8, order=2, generator=loop_gen)
        hist, _, _ = np.histogram2d(
            x[:, 1, 0, 0].cpu().numpy(),
            x[:, 0, 0, 0].cpu().numpy(),
            bins=128,
            range=[[-4.2, 4.2]] * 2,
        )
        img = (np.clip(hist[::-1] / max(hist.max(), 1) * 3, 0, 1) * 255).astype(np.uint8)
        grid = np.repeat(img[:, :, None], 3, axis=2)
    else:
        n = v.num_images
        labels = (torch.arange(n) % max(m.num_classes, 1)).to(device)
        noise = torch.randn(n, m.in_channels, m.sample_size, m.sample_size, generator=gen).to(
            device
        )
        x = sample(
            model.denoiser,
            noise,
            solver=v.solver,
            num_steps=v.num_steps,
            num_substeps=v.num_substeps if v.solver == "gm-ode" else None,
            order=v.order,
            guidance_scale=v.guidance_scale if m.num_classes > 0 else 0.0,
            class_labels=labels,
            null_class_id=m.num_classes,
            spectrum_net=model.spectrum_net if v.solver == "gm-sde" else None,
            generator=loop_gen,
        )
        if vae is not None:
            from gmflow.model_loading import decode_images

            x = decode_images(x, vae) * 2 - 1  # [0, 1] images -> the grid's [-1, 1]
        elif m.in_channels not in (1, 3):
            x = x / x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        grid = samples_to_grid(x, nrow=int(np.ceil(np.sqrt(n))))
    Image.fromarray(grid).save(path)
    metrics_log.add_image("validation/samples", grid, step)
    return path
