"""Networks whose output is a :class:`gmflow.gm.GaussianMixture` over the velocity u."""

from gmflow.models.convert import load_official_gmdit, load_official_spectrum_mlp  # noqa: F401
from gmflow.models.gmdit import GMDIT_PRESETS, GMDiT, build_gmdit  # noqa: F401
from gmflow.models.mlp2d import GMMLP2D, SigmaDenoiser, load_official_toy_mlp  # noqa: F401
from gmflow.models.spectrum import SpectrumMLP  # noqa: F401
