"""Import ``numba.cuda`` on NumPy versions newer than the installed numba-cuda knows.

numba-cuda 0.30 registers an overload for ``np.row_stack`` when ``numba.cuda`` is imported;
NumPy 2.5 removed that alias of ``np.vstack`` (deprecated since NumPy 2.0), so the import raises
``AttributeError`` and no CUDA kernel can be compiled (seen on a CUDA image with NumPy 2.5.2).
:func:`import_numba_cuda` restores the alias, only where it is missing and only for that import's
sake: ``row_stack`` was defined as ``vstack`` itself, so nothing else changes behaviour.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

# Aliases NumPy removed that numba-cuda still names at import time: removed name -> replacement.
_REMOVED_ALIASES = {"row_stack": "vstack"}


def restore_removed_numpy_aliases(module: ModuleType = np) -> list[str]:
    """Set each alias of ``_REMOVED_ALIASES`` missing from ``module``; return the names set."""
    restored = []
    for name, target in _REMOVED_ALIASES.items():
        if not hasattr(module, name):
            setattr(module, name, getattr(module, target))
            restored.append(name)
    return restored


def import_numba_cuda() -> ModuleType:
    """Return ``numba.cuda``, restoring the NumPy aliases its import needs first."""
    restore_removed_numpy_aliases()
    from numba import cuda

    return cuda
