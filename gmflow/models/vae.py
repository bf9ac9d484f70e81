"""The frozen latent autoencoder (SD-VAE): load it, encode images to its posterior, decode latents.

GMFlow's ImageNet models live in the latent space of Stable Diffusion's KL autoencoder, fine-tuned
with EMA (spec 5.3): a 256 x 256 x 3 image in [-1, 1] maps to a diagonal Gaussian posterior
q(z | x) = N(μ(x), diag σ(x)²) over z of shape (4, 32, 32), and the network sees
``x_0 = SD_VAE_SCALING_FACTOR · z`` with z drawn from q. Decoding inverts the scale:
``image = clamp(D(x_0 / scale) / 2 + 1/2, 0, 1)``.

No weights are bundled: ``load_vae`` takes a Hugging Face hub id (downloaded when online, or
found in the local cache) or a local folder written by ``AutoencoderKL.save_pretrained`` (or a
pipeline folder with a ``vae/`` subfolder), and fails with a :class:`CheckpointError` that says
how to get the weights when neither is available.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gmflow.errors import CheckpointError

__all__ = ["SD_VAE_ID", "SD_VAE_SCALING_FACTOR", "VAE", "load_vae"]

SD_VAE_SCALING_FACTOR = 0.18215
"""Latent scale of the SD-VAE: ``x_0 = 0.18215 · z``, which makes the latents of ImageNet roughly
unit-variance. Source: Rombach et al. 2022 (LDM), the ``scale_factor`` of the Stable Diffusion v1
configs, and ``"scaling_factor": 0.18215`` in ``stabilityai/sd-vae-ft-ema/config.json``
(spec 5.3)."""

SD_VAE_ID = "stabilityai/sd-vae-ft-ema"
"""The hub id of the autoencoder GMFlow's ImageNet models were trained with (spec 5.3)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class VAE:
    """A frozen ``diffusers.AutoencoderKL`` with the latent scale of its config.

    ``encode`` and ``decode`` move data to the model's device and dtype and return float32 tensors
    on the caller's device, without gradients.
    """

    model: torch.nn.Module  # diffusers AutoencoderKL, eval mode, requires_grad False
    name: str  # hub id or folder it was loaded from (recorded in manifests)
    scaling_factor: float  # x_0 = scaling_factor · z (config's value; 0.18215 for SD-VAE)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior of the unscaled latent z given images.

        Args:
            images: (B, 3, H, W) in [-1, 1].

        Returns:
            ``(mean, std)`` of q(z | x), each (B, C, H / f, W / f) float32 (f = 8 for SD-VAE), on
            the device of ``images``; std = exp(½ logvar) with logvar clamped to [-30, 20].
        """
        dist = self.model.encode(images.to(self.device, self.dtype)).latent_dist
        return dist.mean.float().to(images.device), dist.std.float().to(images.device)

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """Images from scaled latents: ``clamp(D(x_0 / scaling_factor) / 2 + 1/2, 0, 1)``.

        Args:
            latents: x_0 (B, C, h, w), in the scaled space the network models.

        Returns:
            (B, 3, h·f, w·f) float32 in [0, 1], on the device of ``latents``.
        """
        z = latents.to(self.device, self.dtype) / self.scaling_factor
        images = self.model.decode(z).sample.float()
        return (images / 2 + 0.5).clamp(0, 1).to(latents.device)


def load_vae(
    spec: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VAE:
    """Load a frozen ``AutoencoderKL`` from a local folder or a hub id.

    Args:
        spec: A folder holding ``config.json`` and weights (``save_pretrained`` output), a pipeline
            folder with a ``vae/`` subfolder, or a hub id such as ``stabilityai/sd-vae-ft-ema``
            (the local Hugging Face cache is tried first; the network only when
            ``HF_HUB_OFFLINE`` is unset).
        device: Where the model runs.
        dtype: Compute dtype (float32, bfloat16 or float16).

    Returns:
        The VAE in eval mode without gradients.

    Raises:
        CheckpointError: The folder does not exist or holds no autoencoder, or the hub id is
            neither cached nor downloadable (the message says how to fetch it).
    """
    from diffusers import AutoencoderKL
    from huggingface_hub import constants

    path = Path(spec).expanduser()
    kwargs = {"torch_dtype": dtype, "low_cpu_mem_usage": False}
    if path.is_dir():
        subfolder = None if (path / "config.json").is_file() else "vae"
        if subfolder and not (path / "vae" / "config.json").is_file():
            raise CheckpointError(
                f"VAE folder {path} has no config.json (nor vae/config.json); pass a folder "
                "written by AutoencoderKL.save_pretrained, or a hub id like " + SD_VAE_ID
            )
        try:
            model = AutoencoderKL.from_pretrained(path, subfolder=subfolder, **kwargs)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot load an AutoencoderKL from {path}: {err}") from err
        name = str(path)
    elif not _HUB_ID.match(str(spec)):
        raise CheckpointError(
            f"VAE {str(spec)!r} is neither an existing folder nor a hub id of the form "
            f"'owner/name'; pass e.g. --vae {SD_VAE_ID}, a local folder, or --vae none"
        )
    else:
        name = str(spec)
        model = _from_hub(AutoencoderKL, name, kwargs, offline=bool(constants.HF_HUB_OFFLINE))
    model = model.to(device).eval().requires_grad_(False)
    scaling_factor = float(getattr(model.config, "scaling_factor", SD_VAE_SCALING_FACTOR))
    return VAE(model=model, name=name, scaling_factor=scaling_factor)


def _from_hub(cls: type, hub_id: str, kwargs: dict, *, offline: bool) -> torch.nn.Module:
    """Load from the local cache, else download unless offline; CheckpointError on failure."""
    hint = (
        f"download it on a machine with internet (`huggingface-cli download {hub_id} "
        f"--local-dir DIR`), copy DIR here and pass it as --vae DIR"
    )
    try:
        return cls.from_pretrained(hub_id, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        cached_error = err
    if offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise CheckpointError(
            f"VAE {hub_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so "
            f"it cannot be downloaded; {hint}"
        ) from cached_error
    try:
        return cls.from_pretrained(hub_id, **kwargs)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot download VAE {hub_id!r} from the Hugging Face hub ({err}); if this machine "
            f"is offline, {hint}"
        ) from err
