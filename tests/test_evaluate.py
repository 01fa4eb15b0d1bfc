"""`metarl.evaluate`: frozen objectives against the A2C baseline."""

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from metarl import (
    LearnedTargetsObjective,
    ObjectiveFileError,
    ParametricObjective,
    save_objective,
)
from metarl.config import AgentConfig, ConfigError, EnvConfig, OptimizerConfig
from metarl.evaluate import EvaluateConfig, evaluate, final_returns
from metarl.evaluate import main as evaluate_main


def test_final_returns_average_only_the_last_spans_with_episodes():
    sums = np.array([[10.0, 0.0], [4.0, 6.0], [9.0, 0.0]])
    counts = np.array([[1, 0], [2, 3], [3, 0]])
    np.testing.assert_allclose(final_returns(sums, counts, 1 / 3), [3.0, np.nan])
    np.testing.assert_allclose(final_returns(sums, counts, 2 / 3), [13 / 5, 2.0])


def _evaluate_tiny(objective_path, env: str, run_dir):
    """`evaluate` with 2 seeds x 20 updates of a tiny agent; its summary."""
    config = EvaluateConfig(
        objective_path=str(objective_path),
        env=EnvConfig(name=env),
        agent=AgentConfig(
            num_envs=4,
            unroll_length=8,
            hidden_sizes=(8,),
            optimizer=OptimizerConfig(learning_rate=0.05),
        ),
        seeds=2,
        updates=20,
        report_every=5,
        logger_mode="disabled",
    )
    run_dir.mkdir()
    return evaluate(config, run_dir)


def test_evaluate_writes_curves_and_summary(tmp_path):
    objective = ParametricObjective()
    meta_params = objective.init()
    # A deliberately different objective: the results must differ from A2C's.
    meta_params["log_entropy_coef"] = jnp.float32(np.log(0.5))
    save_objective(
        tmp_path / "obj", objective, meta_params, train_envs=["catch"], meta_step=1
    )
    run_dir = tmp_path / "eval"
    summary = _evaluate_tiny(tmp_path / "obj", "cartpole", run_dir)
    assert set(summary) == {"learned", "a2c"}
    assert summary["learned"] != summary["a2c"]
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    rows = (run_dir / "curves.csv").read_text().splitlines()
    # Header, then 2 objectives x 4 spans x 2 seeds.
    assert len(rows) == 1 + 2 * 4 * 2
    assert (run_dir / "curves.png").stat().st_size > 0


def test_evaluate_trains_with_learned_targets_and_the_baseline(tmp_path):
    objective = LearnedTargetsObjective(prediction_size=4, embed_size=4, hidden_size=8)
    save_objective(
        tmp_path / "obj",
        objective,
        objective.init(),
        train_envs=["catch", "cartpole"],
        meta_step=1,
    )
    run_dir = tmp_path / "eval"
    summary = _evaluate_tiny(tmp_path / "obj", "catch", run_dir)
    assert set(summary) == {"learned", "a2c"}
    for result in summary.values():
        assert np.isfinite(result["final_return_mean"])
    # Both start from the same agents and keys: the curves part only because
    # the two objectives update them differently.
    rows = [r.split(",") for r in (run_dir / "curves.csv").read_text().split()[1:]]
    curves = {name: [r[3] for r in rows if r[0] == name] for name in ("learned", "a2c")}
    assert len(curves["learned"]) == len(curves["a2c"]) == 4 * 2
    assert curves["learned"] != curves["a2c"]


@pytest.mark.parametrize(
    "env, learning_rate, message",
    [
        (("catch", "cartpole"), 1e-3, "evaluate trains on one environment"),
        ("catch", (1e-3, 3e-4), "evaluate trains with one learning rate"),
    ],
)
def test_evaluate_takes_one_env_and_learning_rate(env, learning_rate, message):
    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(
            objective_path="obj",
            env=EnvConfig(name=env),
            agent=AgentConfig(optimizer=OptimizerConfig(learning_rate=learning_rate)),
        )


def test_evaluate_needs_an_objective_path():
    with pytest.raises(ConfigError, match="objective=PATH is required"):
        EvaluateConfig()


def test_evaluate_reports_missing_objective(tmp_path):
    config = EvaluateConfig(
        objective_path=str(tmp_path / "none"), logger_mode="disabled"
    )
    with pytest.raises(ObjectiveFileError, match="missing"):
        evaluate(config, tmp_path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["objective=NOPE", "env=catch"], "no saved objective at NOPE"),
        (["objective=NOPE", "env=[catch,cartpole]"], "evaluate trains on one env"),
        (["objective=NOPE", "seeds=0"], "seeds must be positive, got 0"),
        (["env=catch"], "objective=PATH is required"),
    ],
)
def test_bad_evaluate_command_is_one_line_and_creates_nothing(
    tmp_path, monkeypatch, capsys, argv, message
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["metarl.evaluate", *argv])
    with pytest.raises(SystemExit) as stop:
        evaluate_main()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []
