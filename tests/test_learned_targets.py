"""The learned-targets objective: backward targets, exact meta-gradients, files."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_TRAIN_ARGS, tiny_config

import metarl
from agents import Trajectory
from metarl import LearnedTargetsObjective, ObjectiveFileError
from metarl.config import ObjectiveConfig
from metarl.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SMALL = ObjectiveConfig(
    name="learned_targets", prediction_size=4, embed_size=3, hidden_size=5
)


def _trajectory(t=6, m=4, terminated_at=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    terminated = jnp.zeros((t,), bool).at[terminated_at].set(True)
    return Trajectory(
        obs=jnp.zeros((t, 1)),
        actions=jnp.zeros((t,), jnp.int32),
        rewards=jax.random.normal(keys[0], (t,)),
        terminated=terminated,
        truncated=jnp.zeros((t,), bool),
        values=jnp.zeros((t,)),
        next_values=jnp.zeros((t,)),
        log_probs=jnp.log(jax.random.uniform(keys[1], (t,), minval=0.1)),
        predictions=jax.random.normal(keys[2], (t, m)),
        next_predictions=jax.random.normal(keys[3], (t, m)),
    )


def _changed(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).reshape(len(a), -1).max(-1) > 0


def test_targets_depend_only_on_the_rest_of_the_episode():
    objective = LearnedTargetsObjective(prediction_size=4)
    meta_params = objective.init(jnp.float64)
    trajectory = _trajectory(terminated_at=2)
    pi_hat, y_hat = objective.targets(meta_params, trajectory)
    assert pi_hat.shape == (6,) and y_hat.shape == (6, 4)

    # A later reward in the same episode changes earlier targets only.
    later = trajectory._replace(rewards=trajectory.rewards.at[1].add(1.0))
    pi_later, y_later = objective.targets(meta_params, later)
    np.testing.assert_array_equal(
        _changed(pi_hat, pi_later), [True, True, False, False, False, False]
    )
    np.testing.assert_array_equal(_changed(y_hat, y_later), _changed(pi_hat, pi_later))

    # The episode ended at t = 2: what follows never reaches t <= 2.
    next_episode = trajectory._replace(rewards=trajectory.rewards.at[4].add(1.0))
    pi_next, _ = objective.targets(meta_params, next_episode)
    np.testing.assert_array_equal(
        _changed(pi_hat, pi_next), [False, False, False, True, True, False]
    )


def test_loss_refuses_trajectories_without_predictions():
    trainer = Trainer(dataclasses.replace(tiny_config(), objective=SMALL))
    trajectory = _trajectory()._replace(predictions=None)
    network = trainer.groups[0].network
    params = network.init(jax.random.key(0), jnp.float64)
    with pytest.raises(ValueError, match="needs trajectory fields"):
        trainer.objective.loss(network, params, trainer.objective.init(), trajectory)


@pytest.mark.parametrize("store_rollout", [True, False], ids=["stored", "replayed"])
def test_mixflow_matches_autodiff_with_learned_targets(store_rollout):
    grads = {}
    for mode in ("mixflow", "autodiff"):
        config = dataclasses.replace(
            tiny_config(inner_steps=2, grad=mode, store_rollout=store_rollout),
            objective=SMALL,
        )
        trainer = Trainer(config)
        state = trainer.init(seed=1)
        _, grads[mode] = jax.jit(trainer.meta_gradient)(state)
    assert set(grads["mixflow"]) == set(LearnedTargetsObjective().init())
    for name, grad in grads["mixflow"].items():
        reference = grads["autodiff"][name]
        assert bool(jnp.all(jnp.isfinite(grad))), name
        error = jnp.max(jnp.abs(grad - reference)) / (jnp.max(jnp.abs(reference)))
        assert float(error) < 1e-10, name
    # Both target heads receive meta-gradient.
    for name in ("policy_w", "policy_b", "prediction_w", "prediction_b"):
        assert float(jnp.max(jnp.abs(grads["mixflow"][name]))) > 0.0, name


def test_parametric_network_has_no_prediction_head():
    parametric = Trainer(tiny_config()).groups[0].network
    learned = Trainer(dataclasses.replace(tiny_config(), objective=SMALL)).groups[0]
    learned = learned.network
    assert parametric.prediction_size == 0
    assert learned.prediction_size == SMALL.prediction_size
    assert len(jax.tree.leaves(parametric.init(jax.random.key(0)))) == 6
    assert len(jax.tree.leaves(learned.init(jax.random.key(0)))) == 8


def test_save_load_round_trip_and_feature_mismatch(tmp_path):
    objective = LearnedTargetsObjective(prediction_size=4, hidden_size=5)
    meta_params = objective.init(jnp.float64)
    meta_params["policy_b"] = jnp.asarray([0.25])
    metarl.save_objective(
        tmp_path / "obj", objective, meta_params, train_envs=["catch"], meta_step=3
    )
    loaded = metarl.load_objective(tmp_path / "obj")
    assert loaded.objective == objective
    assert loaded.spec["input_features"] == list(objective.input_features)
    assert loaded.spec["hyperparameters"]["hidden_size"] == 5
    for key, value in meta_params.items():
        np.testing.assert_array_equal(loaded.meta_params[key], value)

    spec_path = tmp_path / "obj" / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["input_features"] = ["reward", "value"]
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(ObjectiveFileError, match="expects input features"):
        metarl.load_objective(tmp_path / "obj")


def test_train_cli_runs_learned_targets_on_catch(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY_TRAIN_ARGS,
        "objective=learned_targets",
        "objective.hidden_size=8",
        "meta.steps=2",
        "logger.log_every=1",
        f"hydra.run.dir={run_dir}",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline")
    result = subprocess.run(
        [sys.executable, "-m", "metarl.train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "meta-step     2/2" in result.stdout
    loaded = metarl.load_objective(run_dir / "objective")
    assert loaded.objective.name == "learned_targets"
    assert loaded.spec["meta_step"] == 2
    assert loaded.meta_params["gru_wx"].shape == (3 + 2 * 8, 3 * 8)
