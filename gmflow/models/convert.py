"""Load official GMFlow checkpoints through explicit key maps (spec 5, 9.1; style guide 11.10 #7).

The official GM-DiT (``GMDiTTransformer2DModel`` / ``_GMDiTTransformer2DModel``, built from
Diffusers DiT blocks) and spectrum net (``_SpectrumMLP``) use Diffusers-style parameter names;
our modules keep their own. The maps (official -> ours; ``{i}`` a block index):

    pos_embed.proj.{weight,bias}                   -> patch_embed.{weight,bias}
    emb.timestep_embedder.linear_1.*               -> time_embed.0.*
    emb.timestep_embedder.linear_2.*               -> time_embed.2.*
    emb.class_embedder.embedding_table.weight      -> class_embed.weight
    transformer_blocks.{i}.norm1.linear.*          -> blocks.{i}.modulation.*
    transformer_blocks.{i}.attn1.to_{q,k,v}.*      -> blocks.{i}.attn.qkv.*   (concatenated q, k, v)
    transformer_blocks.{i}.attn1.to_out.0.*        -> blocks.{i}.attn.proj.*
    transformer_blocks.{i}.ff.net.0.proj.*         -> blocks.{i}.mlp.0.*
    transformer_blocks.{i}.ff.net.2.*              -> blocks.{i}.mlp.2.*
    proj_out_1.*                                   -> final_modulation.*
    proj_out_2.*                                   -> head.proj.*
    gm_out.logstd_layers.{j}.*                     -> head.logstd_mlp.{j}.*
    (spectrum net) mlp.{2j}.*                      -> layers.{j}.*

``pos_embed.pos_embed`` (the fixed sin-cos table, normally not stored) is dropped if present.
A folder holds ``config.json`` and ``diffusion_pytorch_model[.<variant>].safetensors``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gmflow.errors import CheckpointError
from gmflow.models.gmdit import GMDiT
from gmflow.models.mlp2d import load_official_toy_mlp  # re-exported: every official loader is here
from gmflow.models.spectrum import SpectrumMLP

__all__ = [
    "convert_official_gmdit_state_dict",
    "official_gmdit_config_to_kwargs",
    "load_official_gmdit",
    "convert_official_spectrum_state_dict",
    "load_official_spectrum_mlp",
    "load_official_toy_mlp",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model"

_GMDIT_RENAMES: list[tuple[str, str]] = [
    (r"pos_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"emb\.timestep_embedder\.linear_1\.(weight|bias)", r"time_embed.0.\1"),
    (r"emb\.timestep_embedder\.linear_2\.(weight|bias)", r"time_embed.2.\1"),
    (r"emb\.class_embedder\.embedding_table\.weight", r"class_embed.weight"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(weight|bias)", r"blocks.\1.modulation.\2"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"blocks.\1.mlp.0.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"blocks.\1.mlp.2.\2"),
    (r"proj_out_1\.(weight|bias)", r"final_modulation.\1"),
    (r"proj_out_2\.(weight|bias)", r"head.proj.\1"),
    (r"gm_out\.logstd_layers\.(\d+)\.(weight|bias)", r"head.logstd_mlp.\1.\2"),
]
_QKV = re.compile(r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)")
_DROPPED = {"pos_embed.pos_embed"}

# Official constructor argument -> ours (values copied as they are).
_CONFIG_RENAMES = {
    "num_gaussians": "num_gaussians",
    "logstd_inner_dim": "logstd_inner_dim",
    "gm_num_logstd_layers": "num_logstd_layers",
    "num_attention_heads": "num_heads",
    "in_channels": "in_channels",
    "num_layers": "depth",
    "sample_size": "sample_size",
    "patch_size": "patch_size",
    "num_embeds_ada_norm": "num_classes",
    "norm_eps": "norm_eps",
    "constant_logstd": "constant_logstd",
}
# Official keys that must hold these values for our architecture to be the same network.
_CONFIG_FIXED: dict[str, Any] = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
}
# Official keys with no effect on an eval-mode forward of this architecture.
_CONFIG_IGNORED = {
    "dropout",
    "class_dropout_prob",
    "upcast_attention",
    "norm_num_groups",
    "out_channels",
}


def convert_official_gmdit_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official GM-DiT state dict to :class:`~gmflow.models.gmdit.GMDiT` names.

    Args:
        state_dict: official parameter name -> tensor (any device, including meta).

    Returns:
        Our parameter name -> tensor; to_q/to_k/to_v are concatenated into one qkv tensor.

    Raises:
        CheckpointError: on keys the map does not know or an incomplete q/k/v triple.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if key in _DROPPED:
            continue
        match = _QKV.fullmatch(key)
        if match:
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = value
            continue
        for pattern, replacement in _GMDIT_RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            unexpected.append(key)
    for (block, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            absent = ", ".join(f"to_{p}" for p in missing)
            unexpected.append(f"transformer_blocks.{block}.attn1.to_{{q,k,v}}.{kind} (no {absent})")
            continue
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    if unexpected:
        raise CheckpointError(
            f"official GM-DiT state dict has {len(unexpected)} key(s) the converter does not know: "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}; it expects the parameter "
            "names of GMDiTTransformer2DModel (see gmflow.models.convert)"
        )
    return out


def official_gmdit_config_to_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Translate an official GM-DiT ``config.json`` into :class:`GMDiT` keyword arguments.

    Raises:
        CheckpointError: if a required key is missing or a value describes another architecture.
    """
    required = [k for k in (*_CONFIG_RENAMES, "attention_head_dim") if k != "constant_logstd"]
    missing = [k for k in required if k not in config]
    if missing:
        raise CheckpointError(f"official GM-DiT config lacks the key(s) {missing}")
    kwargs = {ours: config[theirs] for theirs, ours in _CONFIG_RENAMES.items() if theirs in config}
    kwargs["hidden_dim"] = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    out_channels = config.get("out_channels")
    if out_channels not in (None, config["in_channels"]):
        raise CheckpointError(
            f"official GM-DiT config has out_channels={out_channels} != in_channels="
            f"{config['in_channels']}; GMDiT models the same variable it takes as input"
        )
    for key, expected in _CONFIG_FIXED.items():
        if key in config and config[key] != expected:
            raise CheckpointError(
                f"official GM-DiT config has {key}={config[key]!r}; only {expected!r} is supported"
            )
    known = {*_CONFIG_RENAMES, *_CONFIG_FIXED, *_CONFIG_IGNORED, "attention_head_dim"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        logger.warning("ignoring unknown official GM-DiT config keys %s", unknown)
    return kwargs


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"no config.json in {folder}; expected an official model folder (config.json and "
            f"{WEIGHTS_NAME}.safetensors), e.g. the transformer/ subfolder of a pipeline snapshot"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def _weights_file(folder: Path, variant: str | None) -> Path:
    if variant is not None:
        path = folder / f"{WEIGHTS_NAME}.{variant}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"no {path.name} in {folder} (variant={variant!r})")
        return path
    plain = folder / f"{WEIGHTS_NAME}.safetensors"
    if plain.is_file():
        return plain
    variants = sorted(folder.glob(f"{WEIGHTS_NAME}.*.safetensors"))
    if len(variants) == 1:
        return variants[0]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"cannot choose a weights file in {folder}: expected {WEIGHTS_NAME}.safetensors or one "
        f"{WEIGHTS_NAME}.<variant>.safetensors (pass variant='bf16'), found {found}"
    )


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several exception types for corrupt files
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _load_into(model: nn.Module, state_dict: dict[str, Tensor], folder: Path, what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{what} weights in {folder} do not match its config: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}, shape mismatches {wrong[:10]}"
        )
    model.load_state_dict(state_dict, strict=True, assign=True)


def load_official_gmdit(
    folder: str | Path, dtype: torch.dtype = torch.float32, variant: str | None = None
) -> GMDiT:
    """Build a :class:`GMDiT` from an official model folder and load its weights (eval mode).

    Args:
        folder: holds ``config.json`` and ``diffusion_pytorch_model[.<variant>].safetensors``.
        dtype: dtype of the returned weights (outputs are fp32 whatever it is).
        variant: e.g. ``"bf16"`` for ``diffusion_pytorch_model.bf16.safetensors``; by default the
            plain file, or the only variant file when there is just one.

    Raises:
        CheckpointError: naming the folder and the missing, unexpected or mis-shaped keys.
    """
    folder = Path(folder)
    kwargs = official_gmdit_config_to_kwargs(_read_config(folder))
    state_dict = convert_official_gmdit_state_dict(_read_weights(_weights_file(folder, variant)))
    with torch.device("meta"):
        model = GMDiT(**kwargs)  # no allocation: the weights are assigned from the checkpoint
    _load_into(model, state_dict, folder, "GM-DiT")
    model.reset_buffers()
    return model.to(dtype).eval()


def convert_official_spectrum_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official ``_SpectrumMLP`` state dict (``mlp.{2j}.*``) to ours (``layers.{j}.*``).

    Raises:
        CheckpointError: on a key that is not ``mlp.<even index>.weight|bias``.
    """
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        match = re.fullmatch(r"mlp\.(\d+)\.(weight|bias)", key)
        if match is None or int(match.group(1)) % 2:
            unexpected.append(key)
            continue
        out[f"layers.{int(match.group(1)) // 2}.{match.group(2)}"] = value
    if unexpected:
        raise CheckpointError(
            f"official spectrum-net state dict has unknown key(s) {unexpected[:10]}; expected "
            "mlp.<0, 2, 4, ...>.weight|bias"
        )
    return out


def load_official_spectrum_mlp(
    folder: str | Path, dtype: torch.dtype = torch.float32, variant: str | None = None
) -> SpectrumMLP:
    """Build a :class:`SpectrumMLP` from an official folder (config ``base_size``, ``layers``).

    Raises:
        CheckpointError: naming the folder and the missing, unexpected or mis-shaped keys.
    """
    folder = Path(folder)
    config = _read_config(folder)
    if "base_size" not in config:
        raise CheckpointError(f"{folder / 'config.json'} lacks 'base_size' (a spectrum-net config)")
    model = SpectrumMLP(
        base_size=tuple(config["base_size"]), layers=tuple(config.get("layers", (64, 8)))
    )
    state_dict = convert_official_spectrum_state_dict(_read_weights(_weights_file(folder, variant)))
    _load_into(model, state_dict, folder, "spectrum-net")
    return model.to(dtype).eval()
