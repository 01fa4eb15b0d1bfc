"""`python -m metarl.train` end to end in a subprocess, on a tiny config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from helpers import TINY_TRAIN_ARGS

import metarl

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_TRAIN_ARGS, "meta.steps=4", "logger.log_every=2"]


def _train(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline")
    return subprocess.run(
        [sys.executable, "-m", "metarl.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_writes_config_metrics_wandb_and_loadable_objective(tmp_path):
    run_dir = tmp_path / "run"
    result = _train([*TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    # A progress line per logged batch of meta-steps.
    lines = [
        line for line in result.stdout.splitlines() if line.startswith("meta-step")
    ]
    assert [line.split("|")[0].split()[1] for line in lines] == ["2/4", "4/4"]
    for line in lines:
        for field in ("env-steps", "steps/s", "return", "meta-loss", "meta-grad-norm"):
            assert field in line
        assert "discount=" in line and "entropy_coef=" in line

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["env"]["name"] == "catch"
    assert config["meta"]["steps"] == 4

    records = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["meta_step"] for r in records] == [2, 4]
    # 2 agents x 4 envs x 4 steps x (2 inner updates + the meta-loss rollout).
    assert records[-1]["perf/env_steps"] == 4 * 2 * 4 * 4 * 3
    for key in ("meta/loss", "meta/grad_norm", "objective/discount", "episode/count"):
        assert key in records[-1]

    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("run-*.wandb"))

    loaded = metarl.load_objective(run_dir / "objective")
    assert loaded.spec["meta_step"] == 4
    assert loaded.spec["train_envs"] == ["catch"]
    discount = 1 / (1 + np.exp(-float(loaded.meta_params["discount_logit"])))
    np.testing.assert_allclose(discount, records[-1]["objective/discount"], rtol=1e-5)


def test_unknown_env_is_one_line_error_listing_names(tmp_path):
    result = _train(["env=nosuchgame"], cwd=tmp_path)
    assert result.returncode != 0
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "nosuchgame" in message
    for name in ("breakout", "asterix", "cartpole", "catch", "space_invaders"):
        assert name in message
    assert not (tmp_path / "outputs").exists()


def test_invalid_value_is_one_line_error(tmp_path):
    result = _train(["env=catch", "meta.population_size=0"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "metarl: error: meta.population_size must be positive, got 0; set it above 0"
    )


def test_list_of_training_envs_trains_one_population_over_both(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *(arg for arg in TINY if not arg.startswith("env=")),
        "env=[catch,cartpole]",
        "meta.population_size=4",
        "agent.optimizer.learning_rate=[0.01,0.003]",
        f"hydra.run.dir={run_dir}",
    ]
    result = _train(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        "metarl: population: catch 2 agents (learning rates 0.01, 0.003; lifetimes "
        "8); cartpole 2 agents (learning rates 0.01, 0.003; lifetimes 8)"
    ) in result.stdout
    lines = [x for x in result.stdout.splitlines() if x.startswith("meta-step")]
    # Each game's return, since their scales differ.
    returns = [x.split(" | return ")[1].split(" | ")[0].split() for x in lines]
    assert returns and all(sorted(r[::2]) == ["cartpole", "catch"] for r in returns)

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["env"]["name"] == ["catch", "cartpole"]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for env in ("catch", "cartpole"):
        assert f"episode/{env}/return" in record
    total = record["episode/catch/count"] + record["episode/cartpole/count"]
    assert total == record["episode/count"]
    loaded = metarl.load_objective(run_dir / "objective")
    assert loaded.spec["train_envs"] == ["catch", "cartpole"]
