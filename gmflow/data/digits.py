"""scikit-learn's 1,797 real 8x8 handwritten digits as an image tree for ``gmflow cache-data``.

    python -m gmflow.data.digits data/digits_images            # 16x16 PNGs in 10 class folders
    gmflow cache-data data/digits_images --out data/digits --vae none --resolution 16

The digits (values 0..16) are scaled to 0..255 and upsampled to ``size`` with bilinear
interpolation; :func:`to_digit_features` maps generated images back to the 8x8, 0..16 feature
space of the original data, where a classifier fitted on the real digits can judge them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

__all__ = ["load_digits_images", "export_digits", "to_digit_features"]


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """The real digits: images (N, 8, 8) float in [0, 16] and labels (N,) int."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the digits dataset ships with scikit-learn: pip install scikit-learn "
            "(or install gmflow with the 'dev' extra)"
        ) from err
    data = load_digits()
    return data.images.astype(np.float64), data.target.astype(np.int64)


def export_digits(out_dir: str | Path, size: int = 16) -> Path:
    """Write every digit as ``out_dir/<digit>/<index>.png`` (grey, size x size); returns out_dir."""
    from PIL import Image

    images, labels = load_digits_images()
    out = Path(out_dir)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = out / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray(np.round(img * (255 / 16)).astype(np.uint8), mode="L")
        grey.resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{i:04d}.png")
    return out


def to_digit_features(images: np.ndarray) -> np.ndarray:
    """Generated images (N, C, H, W) in [-1, 1] -> (N, 64) digit features in [0, 16].

    Channels are averaged (the cached digits are grey stored as RGB), the image is average-pooled
    to 8x8, and the range is mapped back to the dataset's 0..16.
    """
    x = np.asarray(images, dtype=np.float64).mean(axis=1)  # (N, H, W)
    n, h, w = x.shape
    if h % 8 or w % 8:
        raise ValueError(f"to_digit_features: image size {h}x{w} must be a multiple of 8")
    x = x.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))  # (N, 8, 8)
    return np.clip((x + 1) * 8, 0, 16).reshape(n, 64)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m gmflow.data.digits OUT_DIR [SIZE]")
    path = export_digits(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 16)
    print(f"wrote the digits to {path}")
