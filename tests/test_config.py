"""The strict recipe loader: every error names the file, the dotted key and what was expected."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from gmflow.config import apply_overrides, dump_recipe, from_dict, load_recipe, to_dict
from gmflow.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Opt:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    kind: Literal["adamw", "adam"] = "adamw"


@dataclass(frozen=True, kw_only=True)
class Train:
    steps: int = 10
    use_ema: bool = True
    nfes: tuple[int, ...] = (1, 2)
    device: str | None = None
    opt: Opt = field(default_factory=Opt)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass(frozen=True, kw_only=True)
class Run:
    train: Train = field(default_factory=Train)


def test_defaults_and_round_trip(tmp_path):
    cfg = from_dict({"train": {"steps": 5, "opt": {"lr": 1e-3}}}, Run)
    assert cfg.train.steps == 5 and cfg.train.opt.lr == 1e-3 and cfg.train.opt.betas == (0.9, 0.95)
    path = tmp_path / "r.yaml"
    dump_recipe(cfg, path)
    assert load_recipe(path, Run) == cfg
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_unknown_key_names_file_key_and_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  opt:\n    lrr: 1.0\n")
    with pytest.raises(
        ConfigError, match=r"bad\.yaml.*'train\.opt\.lrr'.*valid keys.*betas, kind, lr"
    ):
        load_recipe(path, Run)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"train": {"steps": "ten"}}, r"'train\.steps' expected int, got 'ten'"),
        ({"train": {"steps": 1.5}}, r"'train\.steps' expected int"),
        ({"train": {"steps": True}}, r"'train\.steps' expected int"),
        ({"train": {"use_ema": "yes"}}, r"'train\.use_ema' expected bool"),
        (
            {"train": {"opt": {"kind": "sgd"}}},
            r"'train\.opt\.kind' expected one of 'adamw', 'adam'",
        ),
        ({"train": {"opt": {"betas": [0.9]}}}, r"'train\.opt\.betas' expected a list of 2 items"),
        ({"train": {"nfes": [1, "x"]}}, r"'train\.nfes\[1\]' expected int"),
        ({"train": 3}, r"'train' expected a mapping \(Train\)"),
        ({"train": {"steps": 0}}, r"invalid combination in 'train': steps must be >= 1"),
    ],
)
def test_type_errors(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(data, Run, source="recipe.yaml")


def test_float_accepts_ints_and_yaml_exponent_strings():
    cfg = from_dict({"train": {"opt": {"lr": "1e-4"}}}, Run)
    assert cfg.train.opt.lr == 1e-4
    assert from_dict({"train": {"opt": {"lr": 1}}}, Run).train.opt.lr == 1.0


def test_overrides_are_typed_and_strict():
    cfg = apply_overrides(Run(), ["train.opt.lr=1e-4", "train.nfes=[4, 8]", "train.device=cpu"])
    assert cfg.train.opt.lr == 1e-4 and cfg.train.nfes == (4, 8) and cfg.train.device == "cpu"
    assert apply_overrides(cfg, ["train.device=null"]).train.device is None
    with pytest.raises(ConfigError, match=r"unknown key 'train\.nope'"):
        apply_overrides(Run(), ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(Run(), ["train.steps"])
    with pytest.raises(ConfigError, match=r"'train\.steps' expected int"):
        apply_overrides(Run(), ["train.steps=abc"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml", Run)
    bad = tmp_path / "x.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad, Run)
