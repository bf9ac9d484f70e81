"""The schema of a training recipe (``gmflow train recipe.yaml``): dataclasses, no torch import.

Defaults are the paper's ImageNet GM-DiT settings (spec 11.1) unless a comment says otherwise; each
recipe in ``recipes/`` is complete and standalone. Cross-field checks live in ``__post_init__`` so
that an inconsistent recipe fails at load time, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gmflow.solver_names import SOLVER_VARIANTS

__all__ = [
    "ModelConfig",
    "DataConfig",
    "LossConfig",
    "OptimConfig",
    "EMAConfig",
    "ValidationConfig",
    "OnlineEvalConfig",
    "TrainConfig",
    "ToyBaselineConfig",
    "ToyEvalConfig",
    "ToySectionConfig",
    "RunConfig",
    "GM_SOLVERS",
    "BASELINE_SOLVERS",
]

GM_SOLVERS = ("gm-sde2", "gm-ode2", "gm-sde", "gm-ode")  # gmflow toy: run on the GMFlow model
# gmflow toy: run on the K = 1 flow-matching baseline (the default grid uses euler and heun; the
# Diffusers multistep solvers show the paper's "second-order baselines push mass outwards")
BASELINE_SOLVERS = ("euler", "heun", "dpmpp-2m", "dpmpp-2m-sde", "unipc")
DEFAULT_TOY_SOLVERS = (*GM_SOLVERS, "euler", "heun")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The denoiser (and the optional spectrum net)."""

    arch: Literal["gmdit", "mlp2d"] = "gmdit"
    preset: Literal["S/2", "B/2", "L/2", "XL/2", "custom"] = "XL/2"  # DiT size (gmdit)
    num_gaussians: int = 8  # K, mixture components per pixel
    in_channels: int = 4  # C: 4 for SD-VAE latents, 1/3 for pixels
    sample_size: int = 32  # H = W of the model input
    patch_size: int = 2  # gmdit patch size (custom preset)
    hidden_size: int = 1152  # gmdit width (custom preset only)
    depth: int = 28  # gmdit blocks (custom preset only)
    num_heads: int = 16  # gmdit attention heads (custom preset only)
    num_classes: int = 1000  # class-conditional; the null class id is num_classes
    logstd_inner_dim: int = 1024  # width of the log-std MLP of the GM head
    constant_logstd: float | None = None  # fixed log s (no log-std MLP); K = 1 + this = L2 FM
    use_checkpointing: bool = False  # gradient checkpointing of every block
    use_spectrum_net: bool = True  # train the spectrum MLP for spectral GM-SDE sampling
    spectrum_layers: tuple[int, ...] = (64, 8)
    hidden_dim: int = 512  # mlp2d width
    num_layers: int = 5  # mlp2d depth

    def __post_init__(self) -> None:
        if self.num_gaussians < 1:
            raise ValueError(f"model.num_gaussians must be >= 1, got {self.num_gaussians}")
        if self.arch == "gmdit" and self.sample_size % self.patch_size:
            raise ValueError(
                f"model.sample_size={self.sample_size} must be divisible by "
                f"model.patch_size={self.patch_size}"
            )
        if self.arch == "mlp2d" and (self.in_channels != 2 or self.sample_size != 1):
            raise ValueError(
                "model.arch='mlp2d' is the 2-D toy denoiser: it needs in_channels=2 and "
                "sample_size=1"
            )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where training samples come from."""

    kind: Literal["checkerboard", "shards"] = "shards"
    path: str | None = None  # shards: the cache-data output folder (manifest.json)
    num_workers: int = 4  # shards: DataLoader workers per rank
    shuffle_buffer: int = 10_000  # shards: samples in the shuffle buffer
    label_dropout: float = 0.1  # probability of replacing a label by the null class
    random_flip: bool = True  # shards: horizontal flip with probability ½ per read

    def __post_init__(self) -> None:
        if self.kind == "shards" and not self.path:
            raise ValueError(
                "data.kind='shards' needs data.path (the folder written by cache-data)"
            )
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"data.label_dropout must be in [0, 1), got {self.label_dropout}")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Timestep sampling and the transition / spectral losses (spec 4.1-4.4)."""

    timesteps: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # σ ← s·σ/(1 + (s − 1)σ)
    trans_ratio: float = 0.5  # λ: σ_low = σ_high·(1 − λ); 1 is the plain GM NLL
    loss_scale: float = 8.0  # [LL] scale of the per-channel NLL (8 ≡ [orig] 2 for C = 4)
    spectral_weight: float = 4.0  # w_spec of the spectral loss ([LL])

    def __post_init__(self) -> None:
        if not 0 < self.trans_ratio <= 1:
            raise ValueError(f"loss.trans_ratio must be in (0, 1], got {self.trans_ratio}")
        if self.shift <= 0:
            raise ValueError(f"loss.shift must be > 0, got {self.shift}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW, warm-up and clipping (spec 4.6)."""

    kind: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit needs bitsandbytes (CUDA)
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05  # not applied to biases
    warmup_steps: int = 1000  # linear warm-up from warmup_start_ratio·lr
    warmup_start_ratio: float = 0.001
    grad_clip: float | None = 10.0  # global-norm clipping; null disables it
    grad_clip_from_step: int = 1000  # clipping (and non-finite skipping) active from here
    max_consecutive_skips: int = 20  # raise DivergenceError after this many skipped steps

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True, kw_only=True)
class EMAConfig:
    """EMA of the weights (spec 4.6 rampup, 4.7 karras)."""

    kind: Literal["rampup", "karras", "constant", "none"] = "rampup"
    ema_kimg: float = 30000.0
    rampup: float = 0.05
    gamma: float = 7.0
    beta: float = 0.9999


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """The sample grid drawn from the EMA model during training."""

    every: int = 20_000  # steps between grids (0 disables)
    solver: Literal["gm-ode", "gm-sde"] = "gm-ode"
    order: Literal[1, 2] = 2
    num_steps: int = 16
    num_substeps: int | None = 8
    guidance_scale: float = 0.04
    num_images: int = 16
    # decode latent grids with: "auto" (the VAE named by the shards' manifest.json, if it loads;
    # else the grid shows latent channels), "none", or a VAE hub id / folder (checked at start)
    vae: str = "auto"


@dataclass(frozen=True, kw_only=True)
class OnlineEvalConfig:
    """FID / IS / precision / recall of the EMA model during training (spec 11.1: every 20k steps).

    Every ``every`` steps all ranks sample their share of ``num_samples`` images with one solver
    setting, extract Inception features, and rank 0 logs ``eval/fid``, ``eval/is``,
    ``eval/precision`` and ``eval/recall`` to metrics.jsonl and TensorBoard. The images are those
    of ``gmflow evaluate`` for the same settings and seed (:func:`gmflow.evaluation.samples.
    sample_batch`), so an online number can be re-checked offline with
    ``gmflow evaluate --run RUN --step N``. The reference (ADM .npz, image folder or shards, as
    ``gmflow evaluate --reference``) and the Inception weights are checked before step 0; the
    reference features are computed once and cached under ``RUN/online_eval/``.
    """

    every: int = 0  # steps between evaluations (0 disables; the paper: 20000)
    reference: str | None = None  # required when every > 0
    inception_weights: str | None = None  # torch-fidelity's Inception-v3 .pth (None: its cache)
    num_samples: int = 50_000
    batch_size: int = 125  # images per network call and device
    feature_batch_size: int = 100  # images per Inception call
    solver: str = "gm-ode2"  # a gmflow sample solver name
    num_steps: int = 16
    num_substeps: int | None = 8  # GM-ODE only; None = the paper's default for num_steps
    guidance_scale: float = 0.04  # probabilistic guidance w in [0, 1)
    orthogonal_guidance: float = 1.0
    seed: int = 0  # the sample seeds of gmflow evaluate (spec 11.2)
    precision_recall: bool = True  # needs the reference's features (not a statistics-only .npz)
    dtype: Literal["fp32", "bf16"] = "fp32"  # weights of the sampled copy of the EMA model
    # latent models: the decoder, "auto" (the VAE named by the shards' manifest.json; an error
    # before step 0 if it cannot be loaded) or a VAE hub id / folder
    vae: str = "auto"

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"online_eval.every must be >= 0 (0 disables), got {self.every}")
        if self.every and not self.reference:
            raise ValueError(
                "online_eval.every > 0 needs online_eval.reference: an ADM .npz, an image folder "
                "or gmflow cache-data shards (as gmflow evaluate --reference)"
            )
        if self.solver not in SOLVER_VARIANTS:
            raise ValueError(
                f"online_eval.solver: unknown {self.solver!r}; valid: {list(SOLVER_VARIANTS)}"
            )
        if min(self.num_samples, self.batch_size, self.feature_batch_size, self.num_steps) < 1:
            raise ValueError(
                "online_eval.num_samples, batch_size, feature_batch_size and num_steps must be >= 1"
            )
        if self.num_samples < 2:
            raise ValueError("online_eval.num_samples must be >= 2 (FID needs a covariance)")
        if self.precision_recall and self.num_samples <= 3:
            raise ValueError(
                "online_eval.precision_recall needs more than 3 samples (k = 3 nearest "
                "neighbours); raise online_eval.num_samples or set precision_recall: false"
            )
        if self.num_substeps is not None and self.num_substeps < 1:
            raise ValueError(f"online_eval.num_substeps must be >= 1, got {self.num_substeps}")
        if not 0 <= self.guidance_scale < 1:
            raise ValueError(
                "online_eval.guidance_scale is the probabilistic guidance w and must lie in "
                f"[0, 1), got {self.guidance_scale}"
            )
        if not 0 <= self.orthogonal_guidance <= 1:
            raise ValueError(
                "online_eval.orthogonal_guidance must lie in [0, 1], got "
                f"{self.orthogonal_guidance}"
            )
        from gmflow.evaluation.config import NOISE_SEED_OFFSET, SEED_STRIDE

        top = (2**32 - self.num_samples - NOISE_SEED_OFFSET) // SEED_STRIDE
        if not 0 <= self.seed <= top:
            raise ValueError(
                f"online_eval.seed must lie in [0, {top}] for {self.num_samples} samples (sample i "
                f"uses the generator seed s x {SEED_STRIDE} + i, which must stay below 2^32), "
                f"got {self.seed}"
            )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: batch, steps, precision, checkpoints, logs."""

    max_steps: int = 200_000
    global_batch_size: int = 4096  # = batch_size_per_device × grad_accum_steps × world size
    batch_size_per_device: int = 512
    grad_accum_steps: int = 1
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16: autocast on GPU (CPU always runs fp32); auto: bf16 where the GPU supports it, else
    # fp32. `gmflow toy` reads the same key for its MLP trunk, where auto is bf16 on CUDA and on
    # CPUs with bf16 matrix hardware (AMX, AVX512-BF16), fp32 elsewhere, and bf16 forces a bf16
    # trunk even on CPU (gmflow.toy_train.trunk_dtype). One key rather than a toy-only one: a recipe
    # states one training precision, whichever command trains it.
    precision: Literal["auto", "fp32", "bf16"] = "bf16"
    compile: bool = False  # torch.compile the denoiser
    # TF32 tensor cores for fp32 matmuls and convolutions on CUDA (Ampere and later) while
    # training; spec 4.x allows it. Off: it only speeds up fp32 training (bf16 autocast already
    # runs the trunk in bf16), and it would also round the fp32 GM maths' matmuls to 10 bits.
    tf32: bool = False
    checkpoint_every: int = 1000
    checkpoint_milestones: tuple[int, ...] = (40_000, 80_000, 120_000, 160_000, 200_000)
    keep_last: int = 1
    log_every: int = 100
    use_tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size_per_device < 1 or self.grad_accum_steps < 1:
            raise ValueError("train.batch_size_per_device and train.grad_accum_steps must be >= 1")
        per_rank = self.batch_size_per_device * self.grad_accum_steps
        if self.global_batch_size % per_rank:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"batch_size_per_device × grad_accum_steps = {per_rank}"
            )
        if self.checkpoint_every < 1 or self.keep_last < 1 or self.log_every < 1:
            raise ValueError("train.checkpoint_every, keep_last and log_every must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ToyBaselineConfig:
    """How the K = 1 flow-matching baseline of ``gmflow toy`` differs from its GMFlow model."""

    trans_ratio: float = 1.0  # 1: the loss is exactly ‖u − μ‖²/2 + const (L2 flow matching)
    constant_logstd: float | None = 0.0  # fixed log s (no std head); null: learned, as GMFlow

    def __post_init__(self) -> None:
        if not 0 < self.trans_ratio <= 1:
            raise ValueError(f"toy.baseline.trans_ratio must lie in (0, 1], got {self.trans_ratio}")


@dataclass(frozen=True, kw_only=True)
class ToyEvalConfig:
    """The evaluation grid of ``gmflow toy`` and its metrics (issue 3 §4)."""

    num_samples: int = 100_000  # samples per grid cell (and for the noise floor)
    solvers: tuple[str, ...] = DEFAULT_TOY_SOLVERS
    nfes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # network evaluations per sample
    gm_ode_fine_steps: int = 32  # GM-ODE sub-steps S = max(ceil(fine_steps / N), 2); paper: 128
    batch_size: int = 10_000  # points per sampler call (small chunks stay in the CPU caches)
    sw2_projections: int = 64  # directions of the sliced Wasserstein-2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # trunk matmuls while sampling
    seed: int = 1234  # initial noise and solver noise (the same for every cell)

    def __post_init__(self) -> None:
        unknown = [s for s in self.solvers if s not in GM_SOLVERS + BASELINE_SOLVERS]
        if unknown:
            raise ValueError(
                f"toy.eval.solvers: unknown {unknown}; valid: {list(GM_SOLVERS + BASELINE_SOLVERS)}"
            )
        if min(self.num_samples, self.batch_size, self.gm_ode_fine_steps, *self.nfes) < 1:
            raise ValueError(
                "toy.eval.num_samples, batch_size, gm_ode_fine_steps and every nfes must be >= 1"
            )


@dataclass(frozen=True, kw_only=True)
class ToySectionConfig:
    """The ``toy:`` section: what only ``gmflow toy`` needs besides the training recipe.

    ``gmflow toy`` trains GMFlow from the recipe's model / loss / optim / ema / train settings,
    then a K = 1 baseline that differs as ``baseline`` says, and scores the ``eval`` grid.
    The trainer (``gmflow train``) ignores this section.
    """

    baseline: ToyBaselineConfig = field(default_factory=ToyBaselineConfig)
    eval: ToyEvalConfig = field(default_factory=ToyEvalConfig)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A complete training recipe.

    ``toy`` is optional and only read by ``gmflow toy`` (the K = 1 baseline and the evaluation
    grid of the 2-D checkerboard experiment, see recipes/toy_checkerboard_k64.yaml); the trainer
    ignores it. Absent (null), ``gmflow toy`` uses the defaults of :class:`ToySectionConfig`.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="checkerboard"))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    online_eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    toy: ToySectionConfig | None = None  # gmflow toy only; the trainer ignores it

    def __post_init__(self) -> None:
        if self.data.kind == "checkerboard" and self.model.arch != "mlp2d":
            raise ValueError("data.kind='checkerboard' is 2-D data: it needs model.arch='mlp2d'")
        if self.model.arch == "mlp2d" and self.model.use_spectrum_net:
            raise ValueError("model.use_spectrum_net applies to images; set it false for mlp2d")
        if self.model.arch == "mlp2d" and self.online_eval.every:
            raise ValueError(
                "online_eval (FID) applies to image models; set online_eval.every: 0 for mlp2d"
            )

    def world_size(self) -> int:
        """The number of ranks implied by the batch settings."""
        per_rank = self.train.batch_size_per_device * self.train.grad_accum_steps
        return self.train.global_batch_size // per_rank
