"""The NumPy-alias shim that lets numba-cuda 0.30 import on NumPy >= 2.5."""

from types import ModuleType

import numpy as np

from gmflow.gm._numba_compat import restore_removed_numpy_aliases


def _fake_numpy(**attrs: object) -> ModuleType:
    module = ModuleType("fake_numpy")
    for name, value in attrs.items():
        setattr(module, name, value)
    return module


def test_missing_alias_is_restored_to_its_replacement() -> None:
    fake = _fake_numpy(vstack=np.vstack)
    assert restore_removed_numpy_aliases(fake) == ["row_stack"]
    assert fake.row_stack is np.vstack
    out = fake.row_stack([np.arange(2), np.arange(2)])
    np.testing.assert_array_equal(out, [[0, 1], [0, 1]])


def test_present_alias_is_left_alone() -> None:
    def own(*args: object) -> None:
        return None

    fake = _fake_numpy(vstack=np.vstack, row_stack=own)
    assert restore_removed_numpy_aliases(fake) == []
    assert fake.row_stack is own
