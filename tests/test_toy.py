"""The toy experiment: metrics vs closed forms, a tiny run_toy, `gmflow toy`, its recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from gmflow.config import apply_overrides, from_dict, load_recipe
from gmflow.data.checkerboard import (
    histogram_bin_masses,
    histogram_kl,
    inside_fraction,
    occupied_squares,
    sample_checkerboard,
    sliced_wasserstein2,
)
from gmflow.errors import ConfigError
from gmflow.run_config import RunConfig
from gmflow.toy import (
    ToyConfig,
    ToyTrainConfig,
    load_toy_recipe,
    point_cloud_metrics,
    run_toy,
    toy_config_from_run,
    toy_run_config,
    warmup_lr,
)
from gmflow.toy import _solver_call as solver_call

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy_checkerboard_k64.yaml"
N = 100_000

TINY = [  # --set items of the recipe (RunConfig + toy section)
    "model.num_gaussians=4",
    "model.hidden_dim=16",
    "model.num_layers=1",
    "train.max_steps=3",
    "train.batch_size_per_device=128",
    "train.global_batch_size=128",
    "optim.warmup_steps=2",
    "toy.eval.num_samples=2000",
    "toy.eval.nfes=[1, 2]",
    "toy.eval.gm_ode_fine_steps=4",
    "toy.eval.sw2_projections=8",
]


@pytest.fixture(scope="module")
def exact() -> torch.Tensor:
    return sample_checkerboard(N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


# ---- metrics on known inputs ----


def test_exact_samples_score_the_multinomial_noise_floor(exact):
    # KL(p ‖ counts/N) of N exact draws: E ≈ (M − 1)/(2N) + (5/12) Σ 1/(N² p_i) (second-order
    # expansion of E[−log(1 + δ)], δ the relative count error), sd ≈ sqrt(2(M − 1))/(2N)
    p = histogram_bin_masses(64)
    p = p[p > 0]
    m = len(p)
    expected = (m - 1) / (2 * N) + 5 / 12 * (1 / p).sum().item() / N**2
    sd = math.sqrt(2 * (m - 1)) / (2 * N)
    metrics = point_cloud_metrics(exact)
    assert abs(metrics["kl"] - expected) < 5 * sd
    assert metrics["inside"] == 1.0
    assert metrics["sw2"] < 0.03


def test_gaussian_blob_scores_badly_and_inside_matches_its_closed_form():
    s = 2.0
    x = s * torch.randn(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    # P(x in the occupied cells) = Σ_cells Π_axes [Φ(b/s) − Φ(a/s)]
    def phi(v: float) -> float:
        return 0.5 * (1 + math.erf(v / (s * math.sqrt(2))))

    prob = sum(
        (phi(a + 2) - phi(a)) * (phi(b + 2) - phi(b)) for a, b in occupied_squares().tolist()
    )
    metrics = point_cloud_metrics(x)
    assert abs(metrics["inside"] - prob) < 5 * math.sqrt(prob * (1 - prob) / N)
    assert metrics["kl"] > 0.5
    assert metrics["sw2"] > 0.3


def test_kl_ignores_points_out_of_range_but_inside_counts_them(exact):
    far = torch.full((N // 4, 2), 10.0, dtype=torch.float64)
    mixed = torch.cat([exact, far, torch.full((10, 2), math.nan, dtype=torch.float64)])
    assert histogram_kl(mixed) == pytest.approx(histogram_kl(exact), rel=1e-12)
    assert inside_fraction(mixed) == pytest.approx(N / len(mixed), rel=1e-12)


def test_sliced_w2_of_a_point_mass_is_the_projected_second_moment():
    # all projections 0: SW2² = mean_θ E⟨x, θ⟩² = E|x|²/2 = 16/3 (each coordinate is U[−4, 4])
    x = torch.zeros(1000, 2, dtype=torch.float64)
    assert sliced_wasserstein2(x) == pytest.approx(math.sqrt(16 / 3), rel=2e-3)


def test_sliced_w2_of_a_translation(exact):
    # quantiles of x + d move by ⟨d, θ⟩, and the fixed directions have mean cos²θ = 1/2, so
    # SW2(x + d)² = SW2(x)² + |d|²/2 + 2·mean(e ⟨d, θ⟩), the last term at most √2 |d| SW2(x)
    d = torch.tensor([0.3, -0.4], dtype=torch.float64)
    floor, moved = sliced_wasserstein2(exact), sliced_wasserstein2(exact + d)
    assert abs(moved**2 - floor**2 - 0.125) <= math.sqrt(2) * 0.5 * floor


# ---- small helpers of the trainer and the grid ----


def test_warmup_is_linear_from_the_start_ratio():
    cfg = ToyTrainConfig(lr=2e-4, warmup_steps=1000, warmup_start_ratio=0.001)
    assert warmup_lr(cfg, 0) == pytest.approx(2e-7)
    assert warmup_lr(cfg, 500) == pytest.approx(2e-4 * (1 - 0.5 * 0.999))
    assert warmup_lr(cfg, 1000) == warmup_lr(cfg, 5000) == 2e-4


@pytest.mark.parametrize(
    ("name", "nfe", "expected"),
    [
        ("gm-sde2", 4, ("gm-sde", 2, 4, 4)),
        ("gm-ode", 8, ("gm-ode", 1, 8, 8)),
        ("euler", 16, ("euler", 1, 16, 16)),
        ("heun", 1, ("heun", 1, 1, 1)),  # one step of Heun is one Euler step
        ("heun", 2, ("heun", 1, 1, 1)),  # 2N − 1 evaluations never exceed the budget
        ("heun", 32, ("heun", 1, 16, 31)),
    ],
)
def test_solver_names_and_nfe_budgets(name, nfe, expected):
    assert solver_call(name, nfe) == expected


# ---- the recipe ----


def test_recipe_matches_the_built_in_defaults():
    # `gmflow toy` without --recipe runs exactly the file, and the file maps onto ToyConfig()
    if not RECIPE.is_file():
        pytest.skip(f"{RECIPE} not found (running outside the repository)")
    run = load_recipe(RECIPE, RunConfig)
    assert run == toy_run_config() == load_toy_recipe(None) == load_toy_recipe(RECIPE)
    assert toy_config_from_run(run) == ToyConfig()
    assert run.toy is not None and run.train.precision == "auto" and run.train.device == "cpu"


def test_recipe_and_toy_config_map_both_ways():
    cfg = apply_overrides(
        ToyConfig(),
        [
            "model.num_gaussians=3",
            "train.iters=11",
            "train.batch_size=96",
            "train.lr=5e-4",
            "train.betas=[0.8, 0.9]",
            "train.ema=none",
            "train.precision=bf16",
            "baseline.constant_logstd=null",
            "eval.nfes=[2]",
        ],
    )
    run = toy_run_config(cfg)
    assert (run.train.max_steps, run.train.global_batch_size, run.optim.lr) == (11, 96, 5e-4)
    assert run.toy is not None and run.toy.eval.nfes == (2,)
    assert toy_config_from_run(run) == cfg


def test_gmflow_toy_reexports_the_recipe_mapping():
    import gmflow.toy
    import gmflow.toy_recipe

    for name in gmflow.toy_recipe.__all__:
        assert name in gmflow.toy.__all__
        assert getattr(gmflow.toy, name) is getattr(gmflow.toy_recipe, name)


def test_unified_set_keys_reach_the_experiment():
    run = load_toy_recipe(RECIPE, ["optim.lr=5e-4", "toy.eval.nfes=[1,2]", "ema.gamma=3"])
    cfg = toy_config_from_run(run)
    assert cfg.train.lr == 5e-4 and cfg.eval.nfes == (1, 2) and cfg.train.ema_gamma == 3.0


def test_a_recipe_without_toy_section_uses_the_toy_defaults():
    run = apply_overrides(toy_run_config(), ["toy=null"])
    assert run.toy is None
    assert toy_config_from_run(run) == ToyConfig()
    run = apply_overrides(run, ["toy.eval.nfes=[3]"])  # --set fills in the section
    assert toy_config_from_run(run).eval.nfes == (3,)
    assert toy_config_from_run(run).baseline == ToyConfig().baseline


def test_unknown_key_in_the_toy_section_is_a_strict_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'toy\.eval\.nfe'.*valid keys of toy\.eval"):
        load_toy_recipe(None, ["toy.eval.nfe=[1]"])
    text = RECIPE.read_text().replace("    sw2_projections:", "    sw2_projection:")
    (tmp_path / "r.yaml").write_text(text)
    for load in (lambda p: load_recipe(p, RunConfig), load_toy_recipe):
        with pytest.raises(ConfigError, match=r"r\.yaml: unknown key 'toy\.eval\.sw2_projection'"):
            load(tmp_path / "r.yaml")


def test_old_schema_recipe_names_the_new_keys(tmp_path):
    old = {
        "model": {"num_gaussians": 8},
        "train": {"iters": 10, "batch_size": 256, "lr": 0.01, "ema_gamma": 5.0, "seed": 1},
        "baseline": {"trans_ratio": 1.0},
        "eval": {"nfes": [1]},
    }
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError) as err:
        load_toy_recipe(tmp_path / "old.yaml")
    msg = str(err.value)
    for rename in (
        "train.iters -> train.max_steps",
        "train.batch_size -> train.batch_size_per_device and train.global_batch_size",
        "train.lr -> optim.lr",
        "train.ema_gamma -> ema.gamma",
        "baseline.trans_ratio -> toy.baseline.trans_ratio",
        "eval.nfes -> toy.eval.nfes",
        "recipes/toy_checkerboard_k64.yaml",
    ):
        assert rename in msg
    assert "train.seed" not in msg  # a key of both schemas
    with pytest.raises(
        ConfigError, match=r"--set train\.iters=3: .*train\.iters -> train\.max_steps"
    ):
        load_toy_recipe(None, ["train.iters=3"])
    with pytest.raises(ConfigError, match=r"eval\.nfes -> toy\.eval\.nfes"):
        load_toy_recipe(RECIPE, ["eval.nfes=[1]"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.batch_size_per_device=128"], "global_batch_size .4096. must equal"),
        (["ema.kind=rampup"], "ema.kind must be 'karras' or 'none'"),
        (["optim.grad_clip=1.0"], "optim.grad_clip must be null"),
        (["loss.timesteps=logit_normal"], "loss.timesteps must be 'uniform'"),
        (["model.constant_logstd=0.0"], "toy.baseline.constant_logstd"),
        (["train.tf32=true"], "train.tf32 must be false"),
    ],
)
def test_settings_the_toy_cannot_honour_are_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        toy_config_from_run(load_toy_recipe(None, overrides))


def test_a_gmdit_recipe_is_a_clear_error():
    from gmflow.run_config import DataConfig

    with pytest.raises(ConfigError, match=r"model\.arch must be 'mlp2d'.*data\.kind"):
        toy_config_from_run(RunConfig(data=DataConfig(kind="shards", path="x")))


# ---- run_toy and the command, on a tiny budget ----


@pytest.mark.slow
def test_run_toy_writes_every_output(tmp_path):
    import numpy as np
    from safetensors.torch import load_file

    from gmflow.models.mlp2d import GMMLP2D

    run = load_toy_recipe(None, TINY)
    cfg = toy_config_from_run(run)
    events = []
    result = run_toy(run, tmp_path, progress=events.append)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.yaml", "metrics.json", "report.md", "samples.png", "loss.png"} <= names
    assert set(result.files.values()) <= set(tmp_path.iterdir())
    # metrics.json: exactly the structure of the issue (plus timing fields)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == result.metrics
    assert {"grid", "noise_floor", "train"} <= set(metrics)
    cells = {(c["solver"], c["nfe"]) for c in metrics["grid"]}
    assert cells == {(s, n) for s in cfg.eval.solvers for n in cfg.eval.nfes}
    for c in metrics["grid"]:
        assert {"solver", "nfe", "kl", "inside", "sw2", "seconds"} <= set(c)
        assert c["kl"] >= 0 and 0 <= c["inside"] <= 1 and c["sw2"] >= 0
    assert set(metrics["noise_floor"]) == {"kl", "inside", "sw2"}
    assert metrics["noise_floor"]["inside"] == 1.0
    assert set(metrics["train"]) == {"gmflow", "baseline"}
    for info in metrics["train"].values():
        assert info["seconds_per_iter"] > 0 and math.isfinite(info["final_loss"])
    # the report has one table row per solver, the figures are PNGs, the config reloads
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {s} |" in report for s in cfg.eval.solvers)
    for png in ("samples.png", "loss.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # config.yaml is the recipe: `gmflow toy --recipe` and `gmflow train` both load it
    assert load_toy_recipe(tmp_path / "config.yaml") == run
    assert load_recipe(tmp_path / "config.yaml", RunConfig) == run
    # the saved EMA weights load into a fresh network
    net = GMMLP2D(num_gaussians=4, hidden_dim=16, num_layers=1)
    net.load_state_dict(load_file(str(result.files["gmflow_weights"])))
    # progress: both trainings and the evaluation report their last step
    done = {e.task for e in events if e.completed == e.total}
    assert done == {"train gmflow", "train baseline", "evaluate"}
    assert np.isfinite([c["kl"] for c in metrics["grid"]]).all()


def test_run_toy_trains_only_the_models_the_grid_uses(tmp_path):
    # run_toy also takes the resolved ToyConfig; config.yaml is then its recipe
    run = load_toy_recipe(None, [*TINY, "toy.eval.solvers=[euler]", "toy.eval.nfes=[1]"])
    cfg = toy_config_from_run(run)
    result = run_toy(cfg, tmp_path)
    assert set(result.metrics["train"]) == {"baseline"}
    assert [c["solver"] for c in result.metrics["grid"]] == ["euler"]
    assert load_toy_recipe(tmp_path / "config.yaml") == run


def test_diffusers_baselines_run_on_the_k1_model(tmp_path):
    run = load_toy_recipe(None, [*TINY, "toy.eval.solvers=[dpmpp-2m, dpmpp-2m-sde, unipc]",
                                 "toy.eval.nfes=[2]"])  # fmt: skip
    result = run_toy(toy_config_from_run(run), tmp_path)
    assert set(result.metrics["train"]) == {"baseline"}
    grid = result.metrics["grid"]
    assert [c["solver"] for c in grid] == ["dpmpp-2m", "dpmpp-2m-sde", "unipc"]
    assert all(c["network_evals"] == 2 and math.isfinite(c["kl"]) for c in grid)


@pytest.mark.slow
def test_gmflow_toy_command(tmp_path):
    from typer.testing import CliRunner

    from gmflow_cli.main import app

    args = ["toy", "--k", "4", "--iters", "2", "--batch-size", "64", "--out-dir", str(tmp_path)]
    args += ["--recipe", str(RECIPE)]
    for item in TINY[1:3] + TINY[6:] + ["toy.eval.solvers=[gm-sde2, euler]", "optim.lr=5e-4"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "KL" in result.output and "noise floor" in result.output
    run = load_toy_recipe(tmp_path / "config.yaml")
    assert run.model.num_gaussians == 4 and run.train.max_steps == 2 and run.optim.lr == 5e-4
    assert run.train.batch_size_per_device == run.train.global_batch_size == 64
    cfg = toy_config_from_run(run)
    assert cfg.train.iters == 2 and cfg.train.batch_size == 64 and cfg.eval.nfes == (1, 2)
    assert (tmp_path / "metrics.json").is_file()


def test_gmflow_toy_dry_run_applies_flags_after_set():
    from typer.testing import CliRunner

    from gmflow_cli.main import app

    result = CliRunner().invoke(
        app,
        ["toy", "--dry-run", "--set", "train.max_steps=7", "--iters", "9", "--batch-size", "32"],
    )
    assert result.exit_code == 0, result.output
    run = from_dict(yaml.safe_load(result.output), RunConfig)
    assert run.train.max_steps == 9
    assert run.train.batch_size_per_device == run.train.global_batch_size == 32
    assert run.toy == toy_run_config().toy


def test_gmflow_toy_rejects_old_set_keys():
    from typer.testing import CliRunner

    from gmflow_cli.main import app

    result = CliRunner().invoke(app, ["toy", "--dry-run", "--set", "train.lr=1e-3"])
    assert isinstance(result.exception, ConfigError)
    assert "train.lr -> optim.lr" in str(result.exception)


def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from typer.testing import CliRunner

    from gmflow_cli.main import app

    result = CliRunner().invoke(app, ["toy", "--device", "cuda", "--out-dir", str(tmp_path)])
    assert isinstance(result.exception, ConfigError)
    assert "CUDA is not available" in str(result.exception)


# ---- the trainer ----


def test_precision_settings():
    from gmflow.toy_train import cpu_has_fast_bf16, trunk_dtype

    cpu = torch.device("cpu")
    assert trunk_dtype("fp32", cpu) is None
    assert trunk_dtype("bf16", cpu) is torch.bfloat16
    assert trunk_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_fast_bf16() else None)
    with pytest.raises(ValueError, match="precision"):
        trunk_dtype("fp16", cpu)


def test_toy_loss_of_a_fixed_std_k1_model_is_l2_flow_matching():
    # spec 4.3 item 7: K = 1, s = 1, λ = 1 ⇒ per pixel ‖u − μ‖²/2 + C log σ_high + (C/2) log 2π,
    # and the [LL] loss is scale · mean(ℓ / C); replay the same draws with an identical generator
    from gmflow.flow import sample_timesteps, transition_pair
    from gmflow.toy import ToyModelConfig, build_toy_model, toy_loss

    net = build_toy_model(
        ToyModelConfig(hidden_dim=16, num_layers=1), num_gaussians=1, constant_logstd=0.0
    )
    net = net.double()
    x0 = sample_checkerboard(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = x0.reshape(-1, 2, 1, 1)
    loss = toy_loss(
        net, x0, trans_ratio=1.0, loss_scale=2.0, generator=torch.Generator().manual_seed(5)
    )
    g = torch.Generator().manual_seed(5)
    sigma = sample_timesteps(64, generator=g, dtype=torch.float64)
    x_low, x_high, sigma_low = transition_pair(x0, sigma, 1.0, g)
    assert (sigma_low == 0).all() and torch.equal(x_low, x0)
    u = (x_high - x0) / sigma[:, None, None, None]
    mu = net(x_high, 1000 * sigma).means[:, 0]
    per_pixel = (
        0.5 * (u - mu).square().sum(1) + 2 * torch.log(sigma)[:, None, None] + math.log(2 * math.pi)
    )
    torch.testing.assert_close(loss, 2.0 * per_pixel.mean() / 2, rtol=1e-9, atol=1e-9)


def _train_tiny(*overrides: str):
    from gmflow.toy import ToyModelConfig, build_toy_model, train_toy_model

    base = ["train.iters=60", "train.batch_size=512", "train.lr=3e-3", "train.warmup_steps=5"]
    cfg = apply_overrides(ToyConfig(), [*base, "train.precision=fp32", *overrides]).train
    torch.manual_seed(0)
    net = build_toy_model(ToyModelConfig(hidden_dim=32, num_layers=2), num_gaussians=4)
    log = train_toy_model(net, cfg, trans_ratio=0.9, device=torch.device("cpu"))
    return net, log


def test_training_reduces_the_loss():
    _, log = _train_tiny("train.ema=none")
    assert len(log.losses) == 60 and log.seconds_per_iter > 0
    first, last = sum(log.losses[:10]) / 10, sum(log.losses[-10:]) / 10
    assert last < first - 0.5  # the NLL starts near 5.5 nats per point and drops fast


def test_training_ends_on_the_karras_ema_weights():
    # the EMA does not change the optimisation, so all runs share the iterates θ_0..θ_T;
    # β_i = (1 − 1/(i+1))^(γ+1) → 0 as γ → ∞ makes the EMA the last iterate, γ = 7 averages
    last, _ = _train_tiny("train.ema=none")
    sharp, _ = _train_tiny("train.ema=karras", "train.ema_gamma=1e9")
    averaged, _ = _train_tiny("train.ema=karras", "train.ema_gamma=7")
    for name, p in last.state_dict().items():
        torch.testing.assert_close(sharp.state_dict()[name], p, rtol=0, atol=0)
    diff = max(
        (averaged.state_dict()[n] - p).abs().max().item() for n, p in last.state_dict().items()
    )
    assert diff > 1e-4


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [("iters", 0, "train.max_steps"), ("batch_size", 0, "train.batch_size_per_device"),
     ("warmup_steps", -1, "optim.warmup_steps"), ("lr", 0.0, "optim.lr"),
     ("trans_ratio", 1.5, "loss.trans_ratio")],
)  # fmt: skip
def test_toy_train_config_errors_name_the_recipe_key(field, value, key):
    """A notebook building ToyTrainConfig directly learns both names of a bad setting."""
    from gmflow.toy_recipe import ToyTrainConfig

    with pytest.raises(ValueError, match=rf"ToyTrainConfig\.{field} \(recipe key {key}\)"):
        ToyTrainConfig(**{field: value})
