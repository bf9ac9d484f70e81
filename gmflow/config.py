"""Strict YAML recipes <-> frozen dataclasses (style.md 11.4). Imports no torch.

A recipe is plain YAML data. :func:`load_recipe` converts it into a tree of frozen dataclasses:
an unknown key, a wrong type or a bad choice raises :class:`~gmflow.errors.ConfigError` that names
the file, the dotted key, what was expected and the valid keys. ``--set a.b=value`` overrides are
parsed with ``yaml.safe_load`` and applied through the same strict path.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from gmflow.errors import ConfigError

__all__ = [
    "load_recipe",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "dump_recipe",
    "parse_override",
]

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple, Sequence):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise a ConfigError naming ``key``."""

    def fail() -> ConfigError:
        return ConfigError(
            f"{source}: key '{key}' expected {_type_name(tp)}, got {value!r} "
            f"({type(value).__name__})"
        )

    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise fail()
        return _build(tp, value, key, source)
    if origin is Literal:
        if value not in get_args(tp):
            raise fail()
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        schemas = [a for a in args if dataclasses.is_dataclass(a)]
        if len(schemas) == 1 and isinstance(value, Mapping):
            return _convert(value, schemas[0], key, source)  # its errors name the nested key
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                continue
        raise fail()
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(
                    f"{source}: key '{key}' expected a list of {len(args)} items, got {value!r}"
                )
            return tuple(
                _convert(v, a, f"{key}[{i}]", source)
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin in (tuple, Sequence) else items
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 (no dot) as a string; accept numeric strings for floats only
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    raise fail() from None
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise fail()
        return Path(value)
    raise ConfigError(f"{source}: key '{key}' has an unsupported schema type {tp!r}")


def _build(schema: type[T], data: Mapping[str, Any], prefix: str, source: str) -> T:
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(
                f"{source}: unknown key '{dotted}'; valid keys"
                f"{' of ' + prefix if prefix else ''}: {', '.join(sorted(fields))}"
            )
        kwargs[name] = _convert(value, hints[name], dotted, source)
    try:
        return schema(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(f"{source}: invalid combination{where}: {err}") from None


def from_dict(data: Mapping[str, Any] | None, schema: type[T], source: str = "<config>") -> T:
    """Build a frozen dataclass tree from plain data, strictly.

    Args:
        data: nested mappings of plain values (None means all defaults).
        schema: the top-level dataclass type.
        source: what to name in error messages (usually the file path).

    Returns:
        An instance of ``schema``.

    Raises:
        ConfigError: unknown key, wrong type, or a combination rejected by ``__post_init__``.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    return _build(schema, data, "", source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data (YAML/JSON-safe) form of a config tree: tuples become lists, Paths strings."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (['a','b','c'], yaml.safe_load(value))."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. --set optim.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': the key must be a dotted name like optim.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({err})") from None
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else child
            node[part] = child
        node = child
    node[path[-1]] = value


def apply_overrides(cfg: T, overrides: Sequence[str], source: str = "--set") -> T:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied through the strict loader."""
    if not overrides:
        return cfg
    data = to_dict(cfg)
    for text in overrides:
        path, value = parse_override(text)
        _set_path(data, path, value)
    return from_dict(data, type(cfg), source=f"{source} {' '.join(overrides)}")


def load_recipe(path: str | os.PathLike[str], schema: type[T], overrides: Sequence[str] = ()) -> T:
    """Load a YAML recipe into ``schema``, then apply ``--set`` overrides.

    Raises:
        ConfigError: the file is missing or not YAML, or any key/type/combination is invalid.
    """
    cfg = from_dict(read_recipe_yaml(path), schema, source=str(path))
    return apply_overrides(cfg, overrides, source=f"{path} with --set")


def read_recipe_yaml(path: str | os.PathLike[str]) -> Any:
    """Return the parsed YAML of a recipe file (safe loader).

    Raises:
        ConfigError: the file is missing or not YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' does not exist; pass the path of a YAML recipe file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


def dump_recipe(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
