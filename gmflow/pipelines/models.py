"""Diffusers-facing models: :class:`GMDiT` and :class:`SpectrumMLP` as ``ModelMixin, ConfigMixin``.

Both classes *are* our modules (they subclass them), so ``state_dict`` keys are our parameter
names and ``save_pretrained`` writes them; their constructors take the **official** config keys
(those of the released ``transformer/config.json`` and ``spectrum_net/config.json``) through
``@register_to_config``, so a config saved by either library builds the same network.

Loading weights saved in the official parameter layout goes through the key maps of
:mod:`gmflow.models.convert`: Diffusers' ``ModelMixin.from_pretrained`` reads the checkpoint and
hands the state dict to ``_fix_state_dict_keys_on_load`` (in place) before it matches keys
against the model; our override renames official keys there, and leaves our own keys alone.
A checkpoint is official when one of its keys starts with an official-only prefix
(``transformer_blocks.``, ``pos_embed.``, ``emb.``, ``proj_out_``, ``gm_out.``; ``mlp.`` for the
spectrum net); mixed layouts fail in the converter with the offending keys named. Diffusers calls
that hook for single-file checkpoints only; the released weights are one file per model, and a
sharded checkpoint must use our names.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor

from gmflow.models.convert import (
    convert_official_gmdit_state_dict,
    convert_official_spectrum_state_dict,
    official_gmdit_config_to_kwargs,
)
from gmflow.models.gmdit import GMDiT
from gmflow.models.spectrum import SpectrumMLP

__all__ = ["GMDiTTransformer2DModel", "SpectrumMLPModel", "is_official_gmdit_state_dict"]

_OFFICIAL_GMDIT_PREFIXES = ("transformer_blocks.", "pos_embed.", "emb.", "proj_out_", "gm_out.")


def is_official_gmdit_state_dict(keys: Sequence[str] | MutableMapping[str, Any]) -> bool:
    """Whether a GM-DiT state dict (or its keys) uses the official parameter names."""
    return any(str(k).startswith(_OFFICIAL_GMDIT_PREFIXES) for k in keys)


def _module_first_getattr(self: ModelMixin, name: str) -> Any:
    """Submodules, parameters and buffers win over config entries of the same name.

    ``ModelMixin.__getattr__`` serves config entries first (a deprecated shortcut), which would
    hide the spectrum net's ``layers`` ModuleList behind its ``layers`` config entry.
    """
    for store in ("_modules", "_parameters", "_buffers"):
        values = self.__dict__.get(store)
        if values is not None and name in values:
            return values[name]
    return ModelMixin.__getattr__(self, name)


def _replace_in_place(state_dict: MutableMapping[str, Tensor], new: dict[str, Tensor]) -> None:
    state_dict.clear()
    state_dict.update(new)


class GMDiTTransformer2DModel(GMDiT, ModelMixin, ConfigMixin):
    """GM-DiT with the official constructor (config keys of ``transformer/config.json``).

    ``model(x_t, sigma, class_labels)`` is :meth:`GMDiT.forward` (σ ∈ [0, 1], GM over u; the null
    class is ``num_embeds_ada_norm``). Defaults describe the released XL/2, K = 8 model.
    Arguments that only matter for training the official code (``dropout``,
    ``class_dropout_prob``, ``upcast_attention``, ``norm_num_groups``) are kept in the config and
    have no effect; ``activation_fn``, ``attention_bias``, ``norm_type`` and
    ``norm_elementwise_affine`` must keep the values of the architecture (see
    :func:`gmflow.models.convert.official_gmdit_config_to_kwargs`).
    """

    config_name = "config.json"
    __getattr__ = _module_first_getattr

    @register_to_config
    def __init__(
        self,
        num_gaussians: int = 8,
        logstd_inner_dim: int = 1024,
        gm_num_logstd_layers: int = 2,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
        class_dropout_prob: float = 0.0,
        constant_logstd: float | None = None,
    ) -> None:
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__(**official_gmdit_config_to_kwargs(config))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        """Diffusers' loader (official or our parameter names), then the fixed position table.

        The sin-cos table is a non-persistent buffer; rebuilding it after loading keeps it valid
        whatever device or dtype the weights were materialised on.
        """
        out = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        model.reset_buffers()
        return out

    def _fix_state_dict_keys_on_load(self, state_dict: MutableMapping[str, Tensor]) -> None:
        """Rename an official state dict to our names in place (the Diffusers load hook)."""
        if is_official_gmdit_state_dict(state_dict):
            _replace_in_place(state_dict, convert_official_gmdit_state_dict(dict(state_dict)))


class SpectrumMLPModel(SpectrumMLP, ModelMixin, ConfigMixin):
    """The spectrum MLP with the official config keys ``base_size`` (C, H, W) and ``layers``."""

    config_name = "config.json"
    __getattr__ = _module_first_getattr

    @register_to_config
    def __init__(
        self, base_size: Sequence[int] = (4, 32, 32), layers: Sequence[int] = (64, 8)
    ) -> None:
        super().__init__(base_size=tuple(base_size), layers=tuple(layers))

    def _fix_state_dict_keys_on_load(self, state_dict: MutableMapping[str, Tensor]) -> None:
        """Rename official ``mlp.{2j}.*`` keys to our ``layers.{j}.*`` in place."""
        if any(str(k).startswith("mlp.") for k in state_dict):
            _replace_in_place(state_dict, convert_official_spectrum_state_dict(dict(state_dict)))
