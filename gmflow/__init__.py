"""gmflow: Gaussian Mixture Flow Matching (GMFlow, ICML 2025, arXiv 2504.05304).

Kept import-light on purpose: ``import gmflow`` loads no torch, so the CLI starts instantly.
"""

__version__ = "0.1.0.dev0"
