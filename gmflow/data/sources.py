"""Which images a dataset holds and their class labels: class-per-folder trees and Caffe lists.

Two layouts are understood, both relative to a source folder ``SRC``:

* **class per folder** (torchvision ``ImageFolder``): ``SRC/<class>/**/<image>``; the class ids are
  the positions of the folder names in sorted order. For the ImageNet train split
  (``train/<wnid>/*.JPEG``) this gives the Caffe ILSVRC12 order, since Caffe's ``synsets.txt``
  is the sorted list of wnids.
* **a label list** (the Caffe ``train.txt`` of ILSVRC12): one ``relative/path label`` pair per line;
  only the listed files are inputs, and a listed file that does not exist is reported as skipped.

The inputs come back sorted by relative path, so the same tree always gives the same list, and
shard ``i`` of ``gmflow cache-data`` always holds the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gmflow.data.crop import IMAGE_EXTENSIONS
from gmflow.errors import DataError

__all__ = ["ImageInput", "ImageSource", "list_image_inputs"]


@dataclass(frozen=True)
class ImageInput:
    """One input image."""

    path: str  # POSIX path relative to the source folder
    label: int  # class id, >= 0


@dataclass(frozen=True)
class ImageSource:
    """The inputs of a dataset, sorted by path, and its classes."""

    root: Path  # the source folder
    inputs: tuple[ImageInput, ...]  # sorted by path
    class_names: dict[int, str]  # class id -> name (folder name, e.g. an ImageNet wnid)


def list_image_inputs(root: str | Path, labels_file: str | Path | None = None) -> ImageSource:
    """List the images of a class-per-folder tree, or those of a Caffe label list.

    Args:
        root: Source folder.
        labels_file: Optional ``relative/path label`` list (Caffe ``train.txt``); paths are
            relative to ``root``. Without it, classes are the sorted subfolders of ``root``.

    Returns:
        The inputs sorted by relative path, with the class names. With a label list, a class is
        named after the first folder of its first listed file.

    Raises:
        DataError: ``root`` is not a folder, it holds no class folder or no image, or the label
            list is malformed (the message names the line).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"image source {root} is not a folder; pass the folder that holds one "
            "subfolder per class (e.g. ImageNet's train/)"
        )
    if labels_file is not None:
        return _from_label_list(root, Path(labels_file))
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"image source {root} has no class subfolders; expected "
            f"{root}/<class>/<image>, or pass a label list with --labels"
        )
    inputs = []
    for label, class_dir in enumerate(class_dirs):
        for file in class_dir.rglob("*"):
            if file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file():
                inputs.append(ImageInput(file.relative_to(root).as_posix(), label))
    if not inputs:
        raise DataError(
            f"image source {root} has class folders but no image files with a suffix "
            f"in {sorted(IMAGE_EXTENSIONS)}"
        )
    class_names = {label: d.name for label, d in enumerate(class_dirs)}
    return ImageSource(root, tuple(sorted(inputs, key=lambda i: i.path)), class_names)


def _from_label_list(root: Path, labels_file: Path) -> ImageSource:
    if not labels_file.is_file():
        raise DataError(
            f"label list {labels_file} does not exist; expected a text file of "
            "'relative/path label' lines (Caffe ILSVRC12 train.txt)"
        )
    inputs: dict[str, ImageInput] = {}
    class_names: dict[int, str] = {}
    for lineno, line in enumerate(labels_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(
                f"{labels_file}:{lineno}: expected 'relative/path label' with an "
                f"integer label >= 0, found {line!r}"
            )
        path, label = Path(parts[0].strip()).as_posix(), int(parts[1])
        if path in inputs and inputs[path].label != label:
            raise DataError(
                f"{labels_file}:{lineno}: {path} is listed twice with different "
                f"labels ({inputs[path].label} and {label})"
            )
        inputs[path] = ImageInput(path, label)
        class_names.setdefault(label, path.split("/")[0] if "/" in path else str(label))
    if not inputs:
        raise DataError(f"label list {labels_file} lists no image")
    ordered = tuple(sorted(inputs.values(), key=lambda i: i.path))
    return ImageSource(root, ordered, dict(sorted(class_names.items())))
