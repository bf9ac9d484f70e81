"""The ADM centre crop (spec 13.2): how ImageNet images become square training images.

ADM (Dhariwal & Nichol 2021) and DiT prepare ImageNet-256 this way, and GMFlow's cached latents were
made with it, so a model trained on other crops would see slightly different statistics. For an
image of size (W, H) and a target resolution R:

1. while min(W, H) >= 2R: halve both sides with a BOX filter, (W, H) <- (W // 2, H // 2);
2. resize with BICUBIC so the shorter side is R, the longer side rounded: s = R / min(W, H),
   (W, H) <- (round(W s), round(H s));
3. crop R x R at offset ((H - R) // 2, (W - R) // 2) (top, left).

The box halvings are exact averages of 2x2 blocks (no aliasing); only the final bicubic step
interpolates. Grey, palette and RGBA images are converted to RGB *before* step 1, as
``torchvision.datasets.ImageFolder``'s loader does for DiT (RGBA drops its alpha channel, no
compositing); spec 13.2 lists the conversion last, which gives the same result for grey images and
is ill-defined for palette ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from gmflow.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "adm_center_crop", "load_rgb_image"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
)
"""File suffixes (lower case) treated as images when a folder tree is scanned."""


def load_rgb_image(path: str | Path) -> Image.Image:
    """Open an image file, decode it completely and convert it to RGB.

    Args:
        path: Image file (any format PIL reads).

    Returns:
        A fully loaded RGB PIL image (the file is closed).

    Raises:
        DataError: The file cannot be read or decoded (missing, truncated, not an image); the
            message names the file and PIL's reason.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # OSError covers UnidentifiedImageError and truncated files; SyntaxError and ValueError
        # come from some of PIL's format parsers on malformed headers.
        raise DataError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err


def adm_center_crop(image: Image.Image, resolution: int) -> NDArray[np.uint8]:
    """Box-downsample, bicubic-resize and centre-crop an image to ``resolution`` squared (ADM).

    See the module docstring for the three steps.

    Args:
        image: Any PIL image; converted to RGB first if it is not.
        resolution: Side R of the square output, in pixels (> 0).

    Returns:
        uint8 array (R, R, 3), height first (the layout of ``np.asarray(image)``).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(
        tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC
    )
    arr = np.asarray(image)  # (H, W, 3)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top : top + resolution, left : left + resolution])
