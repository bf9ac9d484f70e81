"""Class names ↔ class ids: the ImageNet synonym lists and the lookup behind ``get_label_ids``.

An ``id2label`` map holds, per class id, a comma-separated list of synonyms (``{17: "jay"}``,
``{0: "tench, Tinca tinca"}``); every stripped synonym names its class. Lookups ignore case. A
synonym that names several classes ("crane": the bird 134 and the machine 517) is refused with
the candidates listed, where Diffusers' ``DiTPipeline`` silently returns the larger id; an
unknown name is refused with the close matches that :mod:`difflib` finds.

``imagenet_classes.json`` beside this module holds the 1000 ILSVRC-2012 classes in Caffe order
(the order of ``synset_words.txt``, which GMFlow's labels 0..999 use), as WordNet lemma lists.
Source: the widely used ``imagenet1000_clsidx_to_labels`` listing (GitHub gist
yrevar/942d3a0ac09ec9e5eb3a, the same strings as the ``id2label`` of ``facebook/DiT-XL-2-256``),
transcribed here; its first synonyms were checked against torchvision's
``_IMAGENET_CATEGORIES``, which agree for all classes but 134 ("crane bird") and 639
("maillot tank suit"), torchvision's own disambiguations.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

from gmflow.errors import ConfigError

__all__ = ["imagenet_id2label", "normalize_id2label", "LabelIndex"]

IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.json")


@cache
def _imagenet() -> tuple[tuple[int, str], ...]:
    data = json.loads(IMAGENET_CLASSES_FILE.read_text(encoding="utf-8"))
    return tuple(sorted((int(k), v) for k, v in data.items()))


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet classes, id (Caffe order) -> "name, synonym, ..."."""
    return dict(_imagenet())


def normalize_id2label(id2label: Mapping[int | str, str] | None) -> dict[int, str] | None:
    """Integer keys (JSON writes them as strings); None stays None.

    Raises:
        ConfigError: a key that is not an integer or a value that is not a string.
    """
    if id2label is None:
        return None
    out: dict[int, str] = {}
    for key, value in id2label.items():
        if not isinstance(value, str):
            raise ConfigError(
                f"id2label[{key!r}] = {value!r} is not a string of comma-separated names"
            )
        try:
            out[int(key)] = value
        except ValueError:
            raise ConfigError(
                f"id2label key {key!r} is not a class id; expected {{'0': 'tench, Tinca tinca'}}"
            ) from None
    return out


class LabelIndex:
    """Case-insensitive synonym -> class ids index of an ``id2label`` map.

    Args:
        id2label: class id -> "name, synonym, ..." (see the module docstring).
    """

    def __init__(self, id2label: Mapping[int, str]) -> None:
        self.id2label = dict(id2label)
        self._ids: dict[str, list[int]] = {}
        self._spelling: dict[str, str] = {}
        for class_id, names in sorted(self.id2label.items()):
            for name in names.split(","):
                name = name.strip()
                if not name:
                    continue
                key = name.casefold()
                self._spelling.setdefault(key, name)
                ids = self._ids.setdefault(key, [])
                if class_id not in ids:
                    ids.append(class_id)

    @property
    def labels(self) -> dict[str, int]:
        """Unambiguous synonym -> id, sorted by name (Diffusers' ``DiTPipeline.labels``)."""
        pairs = ((self._spelling[k], ids[0]) for k, ids in self._ids.items() if len(ids) == 1)
        return dict(sorted(pairs))

    def name(self, class_id: int) -> str:
        """The first synonym of a class, or ``"class <id>"`` when the map has none."""
        names = self.id2label.get(class_id)
        return names.split(",")[0].strip() if names else f"class {class_id}"

    def ids(self, names: str | Iterable[str]) -> list[int]:
        """Class ids of class names; a bare string is one name (not a list of characters).

        Raises:
            ConfigError: a name no class has (listing close matches) or one that several
                classes share (listing them, so that an id can be passed instead).
        """
        if isinstance(names, str):
            names = [names]
        return [self._lookup(name) for name in names]

    def _lookup(self, name: str) -> int:
        if not isinstance(name, str):
            raise ConfigError(f"class name {name!r} is not a string; pass names like 'jay'")
        key = name.strip().casefold()
        ids = self._ids.get(key)
        if ids is None:
            if not self._ids:
                raise ConfigError(
                    f"class name {name!r} cannot be looked up: this model has no class names "
                    "(no id2label); pass class ids instead (e.g. --class-ids 17 18)"
                )
            close = difflib.get_close_matches(key, list(self._ids), n=5, cutoff=0.6)
            hint = (
                "did you mean " + ", ".join(repr(self._spelling[c]) for c in close) + "?"
                if close
                else "no close match"
            )
            raise ConfigError(
                f"unknown class name {name!r} ({hint}); names are the comma-separated synonyms "
                f"of the model's id2label ({len(self.id2label)} classes), or pass class ids"
            )
        if len(ids) > 1:
            options = "; ".join(f"{i}: {self.id2label[i]!r}" for i in ids)
            raise ConfigError(
                f"class name {name!r} names {len(ids)} classes ({options}); pass the class id "
                "instead (e.g. --class-ids) or a synonym that only one of them has"
            )
        return ids[0]
