"""``GMDiTPipeline``: class-conditional GM-DiT sampling behind the Diffusers pipeline API (spec 10).

    pipe = GMDiTPipeline.from_pretrained("Lakonik/gmflow_imagenet_k8_ema", variant="bf16")
    images = pipe(pipe.get_label_ids(["jay", "magpie"]), guidance_scale=0.45).images  # GM-ODE 2
    pipe.scheduler = FlowSDEScheduler.from_config(pipe.scheduler.config)              # GM-SDE 2
    images = pipe([17, 18], num_inference_substeps=1, output_mode="sample").images

The call is a thin layer over :func:`gmflow.flow.sample`; the scheduler's class and the output
mode choose its solver (spec 8.2, 17.4):

    FlowEulerODEScheduler + output_mode='mean'    ->  'gm-ode' with S = num_inference_substeps
    FlowSDEScheduler (h = 1) + output_mode='sample' ->  'gm-sde' (S = 1; the spectrum net, when
                                                       present, draws x0 with spectral noise)

    any Diffusers scheduler that takes a velocity (``prediction_type='flow_prediction'``,
    ``use_flow_sigmas=True``) + output_mode='mean', order=1, S = 1
                                                  ->  'diffusers': a flow-matching baseline on
                                                       the GM mean (spec 17.1), e.g. DPM++ 2M SDE

and the scheduler's ``shift`` warps the σ grid (a Diffusers scheduler's own ``flow_shift``).
Guided steps evaluate the doubled batch [cond; null] in one forward pass (null =
``transformer.num_classes``). Other combinations (the mean with the SDE step, a sample with the
ODE step) raise a ConfigError naming the fix.

Randomness: ``generator`` draws the initial noise (a list gives one generator per sample, as in
Diffusers); the in-loop draws of GM-SDE come from one device generator seeded from it, so a
seeded call is reproducible. Without a generator torch's global RNG is used.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from gmflow.errors import CheckpointError, ConfigError
from gmflow.flow.scheduler_solvers import takes_velocity
from gmflow.flow.solvers import sample
from gmflow.model_loading import decode_images
from gmflow.models.vae import VAE
from gmflow.pipelines.labels import LabelIndex, imagenet_id2label, normalize_id2label
from gmflow.pipelines.loading import (
    COMPONENTS,
    REQUIRED_COMPONENTS,
    pipeline_folder,
    read_model_index,
    resolve_component,
    weights_variant,
)
from gmflow.pipelines.schedulers import FlowEulerODEScheduler, FlowSDEScheduler

__all__ = ["GMDiTPipeline", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class GMDiTPipeline(DiffusionPipeline):
    """GM-DiT sampling: ``transformer``, ``scheduler``, optional ``spectrum_net`` and ``vae``.

    Args:
        transformer: a :class:`~gmflow.pipelines.models.GMDiTTransformer2DModel` (any module with
            the GM denoiser call ``transformer(x_t, sigma, class_labels)`` and ``num_classes``,
            ``in_channels`` and ``sample_size`` attributes).
        scheduler: :class:`FlowEulerODEScheduler` (GM-ODE) or :class:`FlowSDEScheduler` (GM-SDE).
        spectrum_net: a :class:`~gmflow.pipelines.models.SpectrumMLPModel`, used in sample mode.
        vae: a diffusers ``AutoencoderKL``; None for a pixel-space model (x0 in [-1, 1]).
        id2label: class id -> "name, synonym, ..."; None uses the bundled ImageNet names when
            the transformer has 1000 classes (and no names otherwise).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["spectrum_net", "vae"]

    def __init__(
        self,
        transformer: torch.nn.Module,
        scheduler: FlowEulerODEScheduler | FlowSDEScheduler,
        spectrum_net: torch.nn.Module | None = None,
        vae: torch.nn.Module | None = None,
        id2label: dict[int, str] | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, spectrum_net=spectrum_net, vae=vae
        )
        id2label = normalize_id2label(id2label)
        if id2label is not None:
            self.register_to_config(id2label=id2label)
        elif getattr(transformer, "num_classes", None) == 1000:
            id2label = imagenet_id2label()
        self.label_index = LabelIndex(id2label or {})

    @property
    def labels(self) -> dict[str, int]:
        """Unambiguous class name -> id (as Diffusers' ``DiTPipeline.labels``)."""
        return self.label_index.labels

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class ids of ImageNet-style names: ``get_label_ids(['jay', 'magpie']) == [17, 18]``.

        A bare string is one name. Raises :class:`ConfigError` for an unknown name (with close
        matches) or one that several classes share.
        """
        return self.label_index.ids(label)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        custom_pipeline: str | None = None,
        **components: Any,
    ) -> GMDiTPipeline:
        """Load our saved pipelines and snapshots of the official release, folder or hub id.

        Components are matched to our classes by the names in ``model_index.json`` (see
        :mod:`gmflow.pipelines.loading`); weights in the official layout are renamed on load.
        Each model's weights variant defaults to the only one present (the release ships bf16).
        Components passed as keyword arguments (``scheduler=...``) replace the saved ones.

        Raises:
            CheckpointError: a missing folder, file or component, an unknown class, or a hub id
                that is neither cached nor downloadable.
            ConfigError: ``trust_remote_code=True`` or a ``custom_pipeline`` (never supported).
        """
        if trust_remote_code or custom_pipeline is not None:
            raise ConfigError(
                "GMDiTPipeline.from_pretrained never runs code from a snapshot: "
                "trust_remote_code=True and custom_pipeline are not supported"
            )
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise ConfigError(
                f"GMDiTPipeline.from_pretrained: unexpected argument(s) {unknown}; components "
                f"that can be passed are {sorted(COMPONENTS)}"
            )
        folder = pipeline_folder(
            pretrained_model_name_or_path,
            variant=variant,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
        index = read_model_index(folder)
        loaded: dict[str, Any] = {}
        for name in COMPONENTS:
            if name in components:
                loaded[name] = components[name]
                continue
            component_cls = resolve_component(name, index.get(name))
            if component_cls is None and name in REQUIRED_COMPONENTS:
                raise CheckpointError(f"{folder / 'model_index.json'} names no {name}")
            if component_cls is not None:
                component_cls = _load(component_cls, folder / name, torch_dtype, variant)
            loaded[name] = component_cls
        pipe = cls(**loaded, id2label=index.get("id2label"))
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    def _solver(self, output_mode: str, num_substeps: int) -> tuple[str, int | None]:
        """The :func:`gmflow.flow.sample` solver and sub-steps of this scheduler and mode."""
        scheduler = self.scheduler
        if output_mode == "mean" and isinstance(scheduler, FlowEulerODEScheduler):
            return "gm-ode", num_substeps
        if output_mode == "sample" and isinstance(scheduler, FlowSDEScheduler):
            if num_substeps != 1:
                raise ConfigError(
                    f"output_mode='sample' (GM-SDE) takes one sub-step per step; got "
                    f"num_inference_substeps={num_substeps}: pass num_inference_substeps=1"
                )
            if float(scheduler.config.h) != 1.0:
                raise ConfigError(
                    f"GM-SDE samples the exact GM reverse transition, i.e. FlowSDEScheduler with "
                    f"h=1; got h={scheduler.config.h}"
                )
            return "gm-sde", None
        if takes_velocity(scheduler):  # a Diffusers scheduler: a flow-matching baseline
            if output_mode != "mean" or num_substeps != 1:
                raise ConfigError(
                    f"{type(scheduler).__name__} runs on the GM mean as a flow-matching baseline: "
                    f"pass output_mode='mean', num_inference_substeps=1 and order=1 (got "
                    f"output_mode={output_mode!r}, num_inference_substeps={num_substeps})"
                )
            return "diffusers", None
        raise ConfigError(
            f"output_mode={output_mode!r} with {type(scheduler).__name__} is not a GMFlow solver: "
            "use output_mode='mean' with FlowEulerODEScheduler (GM-ODE) or output_mode='sample' "
            "with FlowSDEScheduler (GM-SDE); swap with "
            "pipe.scheduler = FlowSDEScheduler.from_config(pipe.scheduler.config); a Diffusers "
            "baseline scheduler needs prediction_type='flow_prediction' and use_flow_sigmas=True"
        )

    def _class_ids(self, class_labels: Any) -> list[int]:
        if isinstance(class_labels, Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, int | str):
            class_labels = [class_labels]
        ids = [self.label_index.ids(c)[0] if isinstance(c, str) else c for c in class_labels]
        null = int(self.transformer.num_classes)
        is_id = [isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in ids]
        bad = [c for c, ok in zip(ids, is_id, strict=True) if not ok or not 0 <= c <= null]
        if not ids or bad:
            raise ConfigError(
                f"class_labels must be class ids in [0, {null}] ({null} = unconditional) or class "
                f"names; got {class_labels!r}"
            )
        return [int(c) for c in ids]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | Tensor,
        guidance_scale: float = 0.45,
        num_inference_steps: int = 32,
        num_inference_substeps: int = 4,
        output_mode: str = "mean",
        order: int = 2,
        orthogonal_guidance: float = 1.0,
        gm2_coefs: Sequence[float] = (0.005, 1.0),
        gm2_correction_steps: int = 0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Draw one image per class label (spec 10).

        Args:
            class_labels: class ids (or names, looked up with :meth:`get_label_ids`).
            guidance_scale: probabilistic guidance w ∈ [0, 1) (0 = off; 0.45 the README's).
            num_inference_steps: N network evaluations.
            num_inference_substeps: S GM-ODE sub-steps per evaluation (must be 1 in sample mode).
            output_mode: ``'mean'`` (GM-ODE) or ``'sample'`` (GM-SDE).
            order: 1, or 2 for the second-order GM correction.
            orthogonal_guidance: o ∈ [0, 1] of probabilistic guidance.
            gm2_coefs: (c_a, c_b) of the order-2 damping.
            gm2_correction_steps: mean-matching iterations of the order-2 correction (spec 8.3
                step 9); 0 as in the paper.
            generator: torch generator(s) for reproducible draws.
            output_type: ``'pil'``, ``'np'`` (B, H, W, C) float in [0, 1], ``'pt'`` (B, C, H, W)
                or ``'latent'`` (the sampled x0, not decoded).
            return_dict: return an :class:`ImagePipelineOutput` rather than a 1-tuple.

        Raises:
            ConfigError: an option outside its range or an unknown class name.
        """
        if not (isinstance(guidance_scale, int | float) and 0 <= guidance_scale < 1):
            raise ConfigError(
                f"guidance_scale is the probabilistic guidance w and must lie in [0, 1) (0 = off, "
                f"0.45 for images like the paper's), got {guidance_scale!r}; it is not a CFG scale"
            )
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        if output_mode not in ("mean", "sample"):
            raise ConfigError(f"output_mode={output_mode!r}; expected 'mean' or 'sample'")
        solver, num_substeps = self._solver(output_mode, num_inference_substeps)
        ids = self._class_ids(class_labels)
        device = self._execution_device
        transformer = self.transformer
        size = transformer.sample_size
        shape = (len(ids), transformer.in_channels, size, size)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        loop_generator = None
        if generator is not None:
            first = generator[0] if isinstance(generator, list) else generator
            seed = int(torch.randint(0, 2**62, (1,), generator=first, device=first.device))
            loop_generator = torch.Generator(device).manual_seed(seed)
        use_spectrum = solver == "gm-sde" and self.spectrum_net is not None
        with self.progress_bar(total=num_inference_steps) as bar:
            x0 = sample(
                transformer,
                noise,
                solver=solver,
                num_steps=num_inference_steps,
                num_substeps=num_substeps,
                order=order,
                guidance_scale=float(guidance_scale),
                orthogonal_guidance=orthogonal_guidance,
                null_class_id=int(transformer.num_classes),
                gm2_coefs=(float(gm2_coefs[0]), float(gm2_coefs[1])),
                gm2_correction_steps=gm2_correction_steps,
                shift=1.0 if solver == "diffusers" else float(self.scheduler.config.shift),
                scheduler=self.scheduler if solver == "diffusers" else None,
                class_labels=torch.tensor(ids, dtype=torch.long, device=device),
                generator=loop_generator,
                spectrum_net=self.spectrum_net if use_spectrum else None,
                progress=lambda step, total: bar.update(),
            )
        if output_type == "latent":
            images: Any = x0
        else:
            images = decode_images(x0, self._vae())
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                if images.shape[-1] not in (1, 3):
                    raise ConfigError(
                        f"output_type='pil' needs 1 or 3 image channels, got {images.shape[-1]}; "
                        "use output_type='np' or 'pt'"
                    )
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _vae(self) -> VAE | None:
        if self.vae is None:
            return None
        scale = float(getattr(self.vae.config, "scaling_factor", math.nan))
        if not math.isfinite(scale):
            raise CheckpointError("the pipeline's vae config has no scaling_factor")
        return VAE(model=self.vae, name="vae", scaling_factor=scale)


def _load(
    component_cls: type, folder: Any, torch_dtype: torch.dtype | None, variant: str | None
) -> Any:
    """One component from its subfolder; Diffusers' errors become CheckpointErrors."""
    import importlib.util

    from diffusers import SchedulerMixin

    if not folder.is_dir():
        raise CheckpointError(f"pipeline component folder {folder} does not exist")
    try:
        if issubclass(component_cls, SchedulerMixin):
            return component_cls.from_pretrained(folder)
        return component_cls.from_pretrained(
            folder,
            variant=weights_variant(folder, variant),
            torch_dtype=torch_dtype,
            use_safetensors=True,
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot load {component_cls.__name__} from {folder}: {err}") from err
