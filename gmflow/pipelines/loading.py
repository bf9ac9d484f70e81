"""Find a pipeline folder (local or a hub snapshot); map its ``model_index.json`` to our classes.

A pipeline folder holds ``model_index.json`` (component name -> ``[library, class]``, plus an
optional ``id2label``) and one subfolder per component. Folders we save name our classes
(``["gmflow.pipelines.models", "GMDiTTransformer2DModel"]``); the released snapshot
``Lakonik/gmflow_imagenet_k8_ema`` names the original repository's
(``["lib.models.architecture.gmflow", "_GMDiTTransformer2DModel"]``), and LakonLab users rewrite
those to ``lakonlab.models.architecture.gmflow.gmdit`` and friends. :func:`resolve_component`
maps every one of these spellings to our class with an explicit table: it never imports the
named module, so no code from a snapshot ever runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gmflow.errors import CheckpointError

__all__ = [
    "COMPONENTS",
    "OFFICIAL_HUB_ID",
    "resolve_component",
    "read_model_index",
    "pipeline_folder",
    "weights_variant",
]

logger = logging.getLogger(__name__)

OFFICIAL_HUB_ID = "Lakonik/gmflow_imagenet_k8_ema"
"""The released GM-DiT XL/2, K = 8 ImageNet pipeline (EMA weights, ``variant='bf16'``)."""

WEIGHTS_STEM = "diffusion_pytorch_model"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Libraries whose GMFlow classes we re-implement: our own package, the original repository
# (``lib.models...``) and LakonLab (``lakonlab.models...``). Matched by prefix, never imported.
_GMFLOW_LIBRARIES = ("gmflow.", "lib.models.", "lakonlab.models.")

# component -> {class name as written in model_index.json: (our module, our class)}
COMPONENTS: dict[str, dict[str, tuple[str, str]]] = {
    "transformer": {
        "GMDiTTransformer2DModel": ("gmflow.pipelines.models", "GMDiTTransformer2DModel"),
        "_GMDiTTransformer2DModel": ("gmflow.pipelines.models", "GMDiTTransformer2DModel"),
    },
    "spectrum_net": {
        "SpectrumMLPModel": ("gmflow.pipelines.models", "SpectrumMLPModel"),
        "SpectrumMLP": ("gmflow.pipelines.models", "SpectrumMLPModel"),
        "_SpectrumMLP": ("gmflow.pipelines.models", "SpectrumMLPModel"),
    },
    "scheduler": {
        "FlowEulerODEScheduler": ("gmflow.pipelines.schedulers", "FlowEulerODEScheduler"),
        "FlowSDEScheduler": ("gmflow.pipelines.schedulers", "FlowSDEScheduler"),
        # the original repository's name for the same step rule (FlowSDE, h = 1; spec 15.6)
        "GMFlowSDEScheduler": ("gmflow.pipelines.schedulers", "FlowSDEScheduler"),
    },
    "vae": {"AutoencoderKL": ("diffusers", "AutoencoderKL")},
}
REQUIRED_COMPONENTS = ("transformer", "scheduler")


def resolve_component(name: str, entry: Sequence[Any] | None) -> type | None:
    """Our class for a ``model_index.json`` entry, or None for an absent component.

    Args:
        name: component name (``transformer``, ``spectrum_net``, ``vae`` or ``scheduler``).
        entry: ``[library, class_name]`` as written by Diffusers, ``[null, null]`` or None.

    Raises:
        CheckpointError: an entry naming a class or library this loader does not know.
    """
    import importlib

    if entry is None:
        return None
    if not (isinstance(entry, list | tuple) and len(entry) == 2):
        raise CheckpointError(f"model_index.json: {name} = {entry!r}; expected [library, class]")
    library, class_name = entry
    if library is None or class_name is None:
        return None
    table = COMPONENTS[name]
    if name == "scheduler" and library == "diffusers":
        return _diffusers_scheduler(class_name)
    if name == "vae":
        library_ok, expected_library = library == "diffusers", "'diffusers'"
    else:
        library_ok = library == "gmflow" or str(library).startswith(_GMFLOW_LIBRARIES)
        expected_library = "gmflow.*, lib.models.* or lakonlab.models.*"
    if class_name not in table or not library_ok:
        raise CheckpointError(
            f"model_index.json: {name} = [{library!r}, {class_name!r}] is not a component "
            f"GMDiTPipeline can load; expected one of the classes {sorted(table)} from "
            f"{expected_library} (the module is never imported, only its name is matched)"
        )
    module, ours = table[class_name]
    return getattr(importlib.import_module(module), ours)


def _diffusers_scheduler(class_name: str) -> type:
    """A Diffusers scheduler class (a flow-matching baseline a user swapped in and saved).

    Only attributes of the installed ``diffusers`` package that subclass ``SchedulerMixin`` are
    accepted: a scheduler is built from its JSON config alone, so nothing from the folder runs.
    """
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, str(class_name), None) if str(class_name).isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise CheckpointError(
            f"model_index.json: scheduler = ['diffusers', {class_name!r}] is not a scheduler of "
            f"the installed diffusers {diffusers.__version__}; expected a class such as "
            "DPMSolverMultistepScheduler, or one of gmflow's FlowEulerODEScheduler / "
            "FlowSDEScheduler"
        )
    return cls


def read_model_index(folder: Path) -> dict[str, Any]:
    """The parsed ``model_index.json`` of a pipeline folder.

    Raises:
        CheckpointError: no such file, or not a JSON object.
    """
    path = folder / "model_index.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no model_index.json: expected a pipeline folder written by "
            f"GMDiTPipeline.save_pretrained or a snapshot of {OFFICIAL_HUB_ID} (a training run "
            "folder is loaded with `gmflow sample --run DIR` instead)"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(index).__name__}")
    return index


def weights_variant(folder: Path, variant: str | None) -> str | None:
    """The variant to load from a model folder: the one asked for, else the only one there.

    ``None`` picks ``diffusion_pytorch_model.safetensors``, or the single
    ``diffusion_pytorch_model.<variant>.safetensors`` when that is all the folder has (the
    release ships bf16 files only). A requested variant that is missing falls back to the plain
    file (Diffusers' rule).

    Raises:
        CheckpointError: no safetensors weights to choose, or several variants and none asked.
    """
    plain = folder / f"{WEIGHTS_STEM}.safetensors"
    variants = sorted(
        p.name[len(WEIGHTS_STEM) + 1 : -len(".safetensors")]
        for p in folder.glob(f"{WEIGHTS_STEM}.*.safetensors")
    )
    if variant is not None and variant in variants:
        return variant
    if plain.is_file():
        if variant is not None:
            logger.info("%s has no %s weights; loading the plain file", folder, variant)
        return None
    if variant is None and len(variants) == 1:
        return variants[0]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "nothing"
    want = f"variant={variant!r}" if variant is not None else "one of the variants " + str(variants)
    raise CheckpointError(
        f"cannot find the weights in {folder}: expected {WEIGHTS_STEM}.safetensors or "
        f"{WEIGHTS_STEM}.<variant>.safetensors ({want}), found {found}"
    )


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def pipeline_folder(
    name_or_path: str | os.PathLike[str],
    *,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local pipeline folder: the path itself, or the snapshot of a hub id.

    A hub id is looked up in the local Hugging Face cache first, and downloaded only when that
    fails and neither ``local_files_only`` nor ``HF_HUB_OFFLINE`` forbids it. Only configs and
    safetensors weights (of ``variant`` when given) are fetched.

    Raises:
        CheckpointError: neither a folder nor a hub id, or a hub id that is not cached and cannot
            be downloaded; the message says how to bring the files over by hand.
    """
    from huggingface_hub import snapshot_download

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not _HUB_ID.match(name):
        raise CheckpointError(
            f"pretrained pipeline {name!r} is neither an existing folder nor a hub id of the form "
            f"'owner/name' (e.g. {OFFICIAL_HUB_ID})"
        )
    weights = f"*/*.{variant}.safetensors" if variant else "*/*.safetensors"
    kwargs: dict[str, Any] = {
        "revision": revision,
        "cache_dir": cache_dir,
        "token": token,
        "allow_patterns": ["model_index.json", "*/*.json", weights],
    }
    hint = (
        f"on a machine with internet run `hf download {name} --local-dir DIR` (the release's "
        f"weights are the bf16 variant), copy DIR here and pass the folder instead of the hub id"
    )
    try:
        return Path(snapshot_download(name, local_files_only=True, **kwargs))
    except (OSError, ValueError) as err:
        cached_error = err
    if local_files_only or _offline():
        raise CheckpointError(
            f"pipeline {name!r} is not in the local Hugging Face cache and downloads are off "
            f"(HF_HUB_OFFLINE or local_files_only); {hint}"
        ) from cached_error
    try:
        folder = Path(snapshot_download(name, **kwargs))
        missing = [
            f"{c}/*.safetensors"
            for c in COMPONENTS
            if c != "scheduler"
            and (folder / c / "config.json").is_file()
            and not any((folder / c).glob("*.safetensors"))
        ]
        if missing:  # components without the requested variant: fetch their plain weights
            folder = Path(snapshot_download(name, **{**kwargs, "allow_patterns": missing}))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot download pipeline {name!r} from the Hugging Face hub ({err}); if this "
            f"machine is offline, {hint}"
        ) from err
    return folder
