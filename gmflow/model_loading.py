"""Load a GM-DiT for sampling: a pipeline folder or hub id, or a training run.

:func:`load_model` loads the model named by a :class:`gmflow.sampling.SampleConfig` onto its
device, in its dtype, in eval mode:

- ``pretrained`` (a pipeline folder or hub id) through :meth:`GMDiTPipeline.from_pretrained`,
  with the pipeline's own VAE, label index and scheduler shift;
- ``run`` (a training run folder) through :func:`gmflow.training.build.load_run` (EMA or raw
  weights), with the VAE named by ``--vae`` or by the dataset's ``manifest.json`` (``none`` =
  pixel space) and ImageNet labels for 1000 classes, else the manifest's class names.

:func:`decode_images` turns sampled x0 into images in [0, 1] with the loaded VAE (or from pixels).

Errors: :class:`CheckpointError` for missing or unreadable weights (naming the path or hub id
tried) or a run whose latent/pixel space cannot be told without ``--vae``;
:class:`ConfigError` for an unavailable CUDA device, a run that is not an image GM-DiT, or a
model of other than 1 or 3 channels without a VAE (not writable as PNG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gmflow.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from gmflow.sampling import SampleConfig

__all__ = ["DTYPES", "LoadedModel", "load_model", "decode_images"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # network weights dtype


@dataclass
class LoadedModel:
    """A GM denoiser with what sampling needs to know about it."""

    denoiser: nn.Module  # denoiser(x_t, sigma, class_labels) -> GM over u
    spectrum_net: nn.Module | None  # for gm-sde spectral sampling
    vae: Any  # gmflow.models.vae.VAE or None (pixel space)
    num_classes: int  # null (unconditional) class id
    in_channels: int
    sample_size: int
    shift: float  # σ-grid shift of the sampler
    labels: Any  # gmflow.pipelines.labels.LabelIndex
    source: str  # what was loaded (folder or hub id, or run folder)


def scheduler_shift(scheduler: Any) -> float:
    """The σ-grid shift a pipeline's scheduler states: ours call it ``shift``, Diffusers' flow
    schedulers ``flow_shift`` (or ``shift``); 1 where it states none."""
    config = scheduler.config
    for key in ("shift", "flow_shift"):
        if key in config:
            return float(config[key])
    return 1.0


def load_model(cfg: SampleConfig) -> LoadedModel:
    """Load the model of ``cfg`` onto ``cfg.device`` in ``cfg.dtype`` (eval mode).

    Raises:
        CheckpointError: missing or unreadable weights (naming the path or hub id tried).
        ConfigError: an unavailable device or a run that is not an image GM-DiT.
    """
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
    dtype = DTYPES[cfg.dtype]
    if cfg.pretrained is not None:
        model = _load_pretrained(cfg, dtype)
    else:
        model = _load_run(cfg, dtype)
    model.denoiser.to(cfg.device).eval()
    if model.spectrum_net is not None:
        model.spectrum_net.to(cfg.device).eval()
    if model.vae is not None:
        model.vae.model.to(cfg.device)
    elif model.in_channels not in (1, 3):
        raise ConfigError(
            f"{model.source} models {model.in_channels}-channel data without a VAE, which cannot "
            "be written as PNG images; for a latent run pass --vae HUB_ID_OR_DIR"
        )
    return model


def _load_pretrained(cfg: SampleConfig, dtype: torch.dtype) -> LoadedModel:
    from gmflow.models.vae import VAE
    from gmflow.pipelines import GMDiTPipeline

    pipe = GMDiTPipeline.from_pretrained(cfg.pretrained, torch_dtype=dtype, variant=cfg.variant)
    vae = None
    if pipe.vae is not None:
        scale = float(pipe.vae.config.scaling_factor)
        vae = VAE(model=pipe.vae, name=f"{cfg.pretrained}/vae", scaling_factor=scale)
    t = pipe.transformer
    return LoadedModel(
        denoiser=t,
        spectrum_net=pipe.spectrum_net,
        vae=vae,
        num_classes=int(t.num_classes),
        in_channels=int(t.in_channels),
        sample_size=int(t.sample_size),
        shift=scheduler_shift(pipe.scheduler),
        labels=pipe.label_index,
        source=str(cfg.pretrained),
    )


def _load_run(cfg: SampleConfig, dtype: torch.dtype) -> LoadedModel:
    from gmflow.models.vae import load_vae
    from gmflow.pipelines.labels import LabelIndex, imagenet_id2label
    from gmflow.training.build import load_run

    assert cfg.run is not None
    run_cfg, denoiser, spectrum_net = load_run(cfg.run, use_ema=cfg.use_ema, step=cfg.step)
    m = run_cfg.model
    if m.arch != "gmdit":
        raise ConfigError(
            f"run {cfg.run} is a model.arch={m.arch!r} model; gmflow sample draws images from "
            "GM-DiT runs (the 2-D toy draws its own plots: gmflow toy)"
        )
    manifest = _run_manifest(run_cfg)
    vae_spec = cfg.vae
    if vae_spec is None:
        if manifest is None:
            raise CheckpointError(
                f"cannot tell whether run {cfg.run} models VAE latents: its dataset "
                f"{run_cfg.data.path!r} has no readable manifest.json; pass --vae HUB_ID_OR_DIR "
                "(e.g. stabilityai/sd-vae-ft-ema) or --vae none for pixel space"
            )
        vae_spec = manifest.encoder if manifest.mode == "latent" else "none"
    vae = None if vae_spec in (None, "none") else load_vae(vae_spec, device=cfg.device)
    if m.num_classes == 1000:
        id2label = imagenet_id2label()
    else:
        id2label = dict(manifest.classes) if manifest is not None else {}
    return LoadedModel(
        denoiser=denoiser.to(dtype),
        spectrum_net=None if spectrum_net is None else spectrum_net.to(dtype),
        vae=vae,
        num_classes=m.num_classes,
        in_channels=m.in_channels,
        sample_size=m.sample_size,
        shift=float(run_cfg.loss.shift),
        labels=LabelIndex(id2label),
        source=str(cfg.run),
    )


def _run_manifest(run_cfg: Any) -> Any:
    """The run's dataset manifest, or None when it cannot be read."""
    from gmflow.data.manifest import read_manifest
    from gmflow.errors import DataError

    try:
        return read_manifest(run_cfg.data.path) if run_cfg.data.kind == "shards" else None
    except DataError:
        return None


def decode_images(x0: torch.Tensor, vae: Any) -> torch.Tensor:
    """Images in [0, 1] from sampled x0 (B, C, H, W).

    With a :class:`gmflow.models.vae.VAE`: clamp(D(x0 / scaling_factor) / 2 + 1/2, 0, 1) (spec
    5.3); in pixel space (``vae`` None) x0 is the image in [-1, 1]: clamp(x0 / 2 + 1/2, 0, 1).
    Returns float32 on the device of ``x0``.
    """
    if vae is not None:
        return vae.decode(x0)
    return (x0.float() / 2 + 0.5).clamp(0, 1)
