"""The flow-matching path, training noise levels, guidance and the GM solvers (spec 1, 3-4, 6, 8).

Notation (every function in ``gmflow.flow`` follows it):

* **Noise level** σ ∈ [0, 1]: σ = 0 is data, σ = 1 is pure noise; α = 1 − σ. This is GMFlow's
  convention, whose code uses a timestep t = 1000·σ ∈ [0, 1000].
  **Warning:** flow_matching (facebookresearch) and torchcfm use the *opposite* direction
  (t = 1 is data); code ported from them must be flipped (t ↦ 1 − σ, u ↦ −u).
* **Path:** x_σ = (1 − σ)·x0 + σ·ε with ε ~ N(0, I) (``noise`` in code; ``eps`` is reserved for
  numerical floors). Velocity u = ε − x0 = dx/dσ points from data to noise, so x0 = x_σ − σ·u
  and ε = x_σ + (1 − σ)·u; sampling moves σ downwards, x_{σ'} = x_σ + (σ' − σ)·u.
* **Networks** are denoisers ``denoiser(x_t (B, C, H, W), sigma (B,), class_labels)`` that return
  a :class:`gmflow.gm.GaussianMixture` over u. They take σ; a network trained with the reference
  scale sees timestep = 1000·σ inside its embedding only.
* **Shift:** shift(σ) = s·σ / (1 + (s − 1)·σ) acts on σ (s = 1 is the identity).
* **GMs:** ``gm_u`` is a GM over u, ``gm_x0`` a GM over x0 (the denoising distribution); layout
  as in :mod:`gmflow.gm` (means (B, K, C, H, W), log-weights (B, K, 1, H, W), one log-std per
  sample (B, 1, 1, 1, 1)). A level σ is a Python float, a 0-dim tensor or a (B,) tensor (one per
  sample).
* **Solver grids** are explicit and strictly decreasing, σ_0 = 1 > … > σ_M = 0
  (:func:`sigma_grid`); steps are pure functions, :func:`sample` is one loop.

The transition loss lives in :mod:`gmflow.losses` (``losses`` imports ``flow``, never the
reverse, so it is not re-exported here).
"""

from gmflow.flow.guidance import (
    GuidanceResult,
    cfg_guidance,
    guidance_bias,
    guide,
    impose_gaussian,
    probabilistic_guidance,
)
from gmflow.flow.path import (
    SIGMA_FLOOR,
    add_noise,
    forward_transition,
    forward_transition_coefs,
    posterior_condition,
    posterior_mean,
    reverse_transition,
    reverse_transition_coefs,
    u_to_x0,
    velocity_target,
    velocity_to_x0,
    x0_to_u,
    x0_to_velocity,
)
from gmflow.flow.sample_options import SOLVERS
from gmflow.flow.second_order import SecondOrderState, second_order_correction
from gmflow.flow.solvers import Denoiser, SamplerStep, sample
from gmflow.flow.steps import default_num_substeps, flow_euler_step, flow_sde_step
from gmflow.flow.timesteps import (
    TRAIN_SIGMA_EPS,
    sample_timesteps,
    shift_sigma,
    sigma_grid,
    transition_pair,
)

__all__ = [
    # path (spec 1, 3)
    "SIGMA_FLOOR",
    "add_noise",
    "velocity_target",
    "velocity_to_x0",
    "x0_to_velocity",
    "forward_transition_coefs",
    "forward_transition",
    "reverse_transition_coefs",
    "u_to_x0",
    "x0_to_u",
    "reverse_transition",
    "posterior_condition",
    "posterior_mean",
    # noise levels (spec 4.1, 4.2, 8.1)
    "TRAIN_SIGMA_EPS",
    "shift_sigma",
    "sample_timesteps",
    "transition_pair",
    "sigma_grid",
    # guidance (spec 6)
    "GuidanceResult",
    "impose_gaussian",
    "guidance_bias",
    "guide",
    "probabilistic_guidance",
    "cfg_guidance",
    # second order (spec 8.3)
    "SecondOrderState",
    "second_order_correction",
    # solvers (spec 8)
    "SOLVERS",
    "Denoiser",
    "flow_euler_step",
    "flow_sde_step",
    "default_num_substeps",
    "sample",
    "SamplerStep",
]
