"""The ADM centre crop (spec 13.2): exact special cases and a step-by-step PIL computation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gmflow.data.crop import adm_center_crop, load_rgb_image
from gmflow.errors import DataError


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_image_of_the_target_size_is_returned_unchanged():
    img = _random_image(16, 16)
    np.testing.assert_array_equal(adm_center_crop(img, 16), np.asarray(img))


def test_box_halvings_average_2x2_blocks_exactly():
    # 64 x 64 of constant 4 x 4 blocks -> two BOX halvings (64 >= 2·16, 32 >= 2·16) -> 16 x 16
    # whose pixels are the block values, then a bicubic resize by 1 (a no-op): exact.
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    img = Image.fromarray(np.kron(blocks, np.ones((4, 4, 1), dtype=np.uint8)))
    np.testing.assert_array_equal(adm_center_crop(img, 16), blocks)


@pytest.mark.parametrize(("width", "height"), [(21, 16), (16, 27), (31, 16)])
def test_centre_crop_takes_the_middle_rounding_the_offset_down(width, height):
    # shorter side already R: no box step, bicubic resize by exactly 1, only the crop acts
    img = _random_image(width, height, seed=width)
    top, left = (height - 16) // 2, (width - 16) // 2
    expected = np.asarray(img)[top : top + 16, left : left + 16]
    np.testing.assert_array_equal(adm_center_crop(img, 16), expected)


def test_odd_sized_image_matches_the_three_steps_done_by_hand():
    # 131 x 67, R = 16: 67 >= 32 -> BOX to 65 x 33; 33 >= 32 -> BOX to 32 x 16; 16 < 32 stop.
    # Scale 16 / 16 = 1: bicubic to 32 x 16 (identity); crop columns [8, 24).
    img = _random_image(131, 67, seed=2)
    step = img.resize((65, 33), Image.Resampling.BOX).resize((32, 16), Image.Resampling.BOX)
    expected = np.asarray(step)[:, 8:24]
    np.testing.assert_array_equal(adm_center_crop(img, 16), expected)


def test_bicubic_step_rounds_the_longer_side():
    # 45 x 30, R = 16: 30 < 32, scale 16/30 -> (round(24.0), 16) = (24, 16); crop columns [4, 20).
    img = _random_image(45, 30, seed=3)
    resized = img.resize((24, 16), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(adm_center_crop(img, 16), np.asarray(resized)[:, 4:20])


def test_constant_image_stays_constant_at_any_size():
    img = Image.new("RGB", (77, 53), (10, 200, 77))
    out = adm_center_crop(img, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(
        out, np.broadcast_to(np.array([10, 200, 77], np.uint8), out.shape)
    )


def test_grey_and_rgba_inputs_become_rgb(tmp_path):
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), mode="L")
    out = adm_center_crop(grey, 16)
    np.testing.assert_array_equal(out, np.repeat(np.asarray(grey)[..., None], 3, axis=-1))
    rgba = np.random.default_rng(4).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    loaded = load_rgb_image(tmp_path / "a.png")  # alpha is dropped, not composited
    np.testing.assert_array_equal(adm_center_crop(loaded, 16), rgba[..., :3])


def test_unreadable_file_raises_data_error_naming_it(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_rgb_image(bad)
