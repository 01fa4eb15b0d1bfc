"""Whole runs in-process: checkpoints, resuming, NaN guards, W&B failures, stops.

Runs of the same configuration share one compiled trainer (see
`shared_trainers`), so each test pays for compilation at most once.
"""

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import snapshot_files, tiny_config

import metarl.trainer
from metarl import load_objective
from metarl.checkpoint import (
    CHECKPOINT_DIR,
    Checkpointer,
    CheckpointError,
    config_record,
)
from metarl.config import CheckpointConfig, LoggerConfig
from metarl.guard import RunStopped
from metarl.logger import read_metrics
from metarl.train import prepare, run

_REAL_TRAINER = metarl.trainer.Trainer
_TRAINERS = {}


def _maths(config):
    """The part of a config the compiled meta-step depends on."""
    return dataclasses.replace(
        config,
        logger=LoggerConfig(),
        checkpoint=CheckpointConfig(),
        resume=False,
        seed=0,
        meta=dataclasses.replace(config.meta, steps=1, max_consecutive_skips=1),
    )


def _shared_trainer(config):
    """One trainer, and so one compiled meta-step, per configuration's maths."""
    key = _maths(config)
    if key not in _TRAINERS:
        _TRAINERS[key] = _REAL_TRAINER(config)
    return _TRAINERS[key]


@pytest.fixture
def shared_trainers(monkeypatch):
    """Makes `run` reuse one trainer (and its compiled meta-step) per config."""
    monkeypatch.setattr(metarl.trainer, "Trainer", _shared_trainer)
    return _shared_trainer


def _config(steps=6, every=2, **overrides):
    config = tiny_config(dtype="float32", lifetime=6)
    return dataclasses.replace(
        config,
        meta=dataclasses.replace(config.meta, steps=steps),
        checkpoint=CheckpointConfig(every=every, keep=2),
        **overrides,
    )


def _run(config, run_dir):
    return run(config, Path(run_dir), config_record(config))


def _final_state(run_dir, config):
    checkpointer = Checkpointer(run_dir)
    try:
        template = _REAL_TRAINER(config).init(config.seed)
        return checkpointer.restore(checkpointer.latest_step(), template)
    finally:
        checkpointer.close()


def _assert_bitwise_equal(a, b):
    a_leaves = jax.tree.leaves(metarl.checkpoint.encode_keys(a))
    b_leaves = jax.tree.leaves(metarl.checkpoint.encode_keys(b))
    assert len(a_leaves) == len(b_leaves)
    for x, y in zip(a_leaves, b_leaves, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _deterministic(records):
    """Records without wall-clock measurements."""
    return [
        {k: v for k, v in r.items() if not k.startswith("perf/") or k.endswith("steps")}
        for r in records
    ]


@pytest.fixture(scope="module")
def master_run(tmp_path_factory):
    """A run of 6 meta-steps with checkpoints at 4 and 6 (2 is rotated out)."""
    config = _config()
    run_dir = tmp_path_factory.mktemp("master") / "full"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metarl.trainer, "Trainer", _shared_trainer)
        _run(config, run_dir)
    return config, run_dir


@pytest.fixture
def finished_run(master_run, tmp_path, shared_trainers):
    """A copy of `master_run` that a test may damage."""
    config, master = master_run
    shutil.copytree(master, tmp_path / "full")
    return config, tmp_path / "full"


def test_resumed_run_matches_uninterrupted_bitwise(tmp_path, finished_run, capsys):
    config, full_dir = finished_run

    # The same run stopped after 4 meta-steps, with a save of step 6 cut short
    # (orbax's temporary folder), then resumed.
    part_dir = tmp_path / "part"
    _run(
        dataclasses.replace(config, meta=dataclasses.replace(config.meta, steps=4)),
        part_dir,
    )
    junk = part_dir / CHECKPOINT_DIR / "6.orbax-checkpoint-tmp" / "state"
    junk.mkdir(parents=True)
    (junk / "half-written").write_bytes(b"\x00" * 100)
    assert Checkpointer(part_dir).steps() == [2, 4]
    _run(dataclasses.replace(config, resume=True), part_dir)
    assert "resuming from meta-step 4" in capsys.readouterr().out

    full_state, full_counters = _final_state(full_dir, config)
    part_state, part_counters = _final_state(part_dir, config)
    assert int(part_state.step) == 6
    _assert_bitwise_equal(full_state, part_state)
    assert part_counters.env_steps == full_counters.env_steps > 0
    assert not (part_dir / CHECKPOINT_DIR / "6.orbax-checkpoint-tmp").exists()

    # The metrics file holds each meta-step once, with the same values.
    full_records, part_records = read_metrics(full_dir), read_metrics(part_dir)
    assert [r["meta_step"] for r in part_records] == [1, 2, 3, 4, 5, 6]
    assert _deterministic(part_records) == _deterministic(full_records)
    np.testing.assert_array_equal(
        load_objective(full_dir / "objective").meta_params["discount_logit"],
        load_objective(part_dir / "objective").meta_params["discount_logit"],
    )


def test_same_seed_and_config_give_identical_metrics(tmp_path, finished_run):
    config, full_dir = finished_run
    _run(config, tmp_path / "again")
    first, second = read_metrics(full_dir), read_metrics(tmp_path / "again")
    assert len(first) == 6
    assert _deterministic(first) == _deterministic(second)
    # Not trivially equal: the runs learn something and vary over steps.
    losses = {r["meta/loss"] for r in first}
    assert len(losses) > 1

    other = dataclasses.replace(config, seed=1)
    _run(other, tmp_path / "seed1")
    assert _deterministic(read_metrics(tmp_path / "seed1")) != _deterministic(first)


def test_checkpoint_holds_whole_state_with_typed_keys(finished_run):
    config, full_dir = finished_run
    state, counters = _final_state(full_dir, config)
    keys = state.population[0].inner.key
    assert jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    assert keys.shape == (config.meta.population_size,)
    assert int(state.step) == 6 and int(state.skipped) == 0
    assert counters.env_steps == 6 * _REAL_TRAINER(config).env_steps_per_meta_step
    # Every part of the state: objective, its optimiser, and each agent's
    # parameters, optimiser state, environments, key and age.
    template = _REAL_TRAINER(config).init(config.seed)
    assert jax.tree.structure(state) == jax.tree.structure(template)
    for got, want in zip(
        jax.tree.leaves(state), jax.tree.leaves(template), strict=True
    ):
        assert got.shape == want.shape and got.dtype == want.dtype
    moved = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
        metarl.checkpoint.encode_keys(state.population[0].inner),
        metarl.checkpoint.encode_keys(template.population[0].inner),
    )
    assert all(jax.tree.leaves(moved.params)) and any(jax.tree.leaves(moved.env))
    assert Checkpointer(full_dir).steps() == [4, 6]


def test_resume_keeps_saved_settings_and_takes_only_overrides(finished_run):
    config, full_dir = finished_run
    composed = config_record(dataclasses.replace(config, resume=str(full_dir)))
    # What Hydra would compose from the defaults plus `resume=... meta.steps=9`.
    composed["agent"]["num_envs"] = 32
    composed["meta"]["steps"] = 9
    new_config, run_dir, resolved = prepare(
        composed, full_dir, [f"resume={full_dir}", "meta.steps=9"]
    )
    assert run_dir == full_dir
    assert new_config.meta.steps == 9
    assert new_config.agent.num_envs == config.agent.num_envs
    assert resolved["agent"]["num_envs"] == config.agent.num_envs


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: dataclasses.replace(
                c, meta=dataclasses.replace(c.meta, inner_steps=3)
            ),
            "it was trained with meta.inner_steps=2 but this run has "
            "meta.inner_steps=3; drop that override",
        ),
        (
            lambda c: dataclasses.replace(c, meta=dataclasses.replace(c.meta, steps=5)),
            "its checkpoint is at meta-step 6 but meta.steps=5; set meta.steps=6",
        ),
        (lambda c: dataclasses.replace(c, seed=3), "trained with seed=0"),
    ],
)
def test_incompatible_resume_is_refused_and_writes_nothing(
    finished_run, change, message
):
    config, full_dir = finished_run
    before = snapshot_files(full_dir)
    with pytest.raises(CheckpointError, match=message):
        _run(change(dataclasses.replace(config, resume=True)), full_dir)
    assert snapshot_files(full_dir) == before


def test_damaged_checkpoint_is_refused_naming_the_earlier_one(finished_run):
    config, full_dir = finished_run
    data_files = [
        p for p in (full_dir / CHECKPOINT_DIR / "6" / "state").rglob("*") if p.is_file()
    ]
    for path in data_files:
        path.write_bytes(b"garbage")
    before = snapshot_files(full_dir)
    extended = dataclasses.replace(
        config, resume=True, meta=dataclasses.replace(config.meta, steps=8)
    )
    with pytest.raises(
        CheckpointError, match="cannot be read.*resume from meta-step 4"
    ):
        _run(extended, full_dir)
    assert snapshot_files(full_dir) == before


def test_damaged_host_record_is_refused(finished_run):
    config, full_dir = finished_run
    (full_dir / CHECKPOINT_DIR / "6" / "host" / "metadata").write_text('{"config": ')
    with pytest.raises(CheckpointError, match="checkpoints/6 cannot be read"):
        _run(dataclasses.replace(config, resume=True), full_dir)


def test_new_run_in_a_used_directory_is_refused(finished_run):
    config, full_dir = finished_run
    before = snapshot_files(full_dir)
    with pytest.raises(CheckpointError, match="already holds a run; add resume=true"):
        prepare(config_record(config), full_dir, [])
    assert snapshot_files(full_dir) == before


def test_init_from_saved_objective(tmp_path, finished_run, shared_trainers):
    config, full_dir = finished_run
    saved = load_objective(full_dir / "objective").meta_params
    start = dataclasses.replace(
        config,
        objective=dataclasses.replace(
            config.objective, init_from=str(full_dir / "objective")
        ),
        meta=dataclasses.replace(config.meta, steps=1),
    )
    trainer = shared_trainers(start)
    state = metarl.train._from_saved_objective(trainer, trainer.init(0), start)
    for key, value in saved.items():
        np.testing.assert_array_equal(state.meta_params[key], value)

    missing = dataclasses.replace(
        start,
        objective=dataclasses.replace(start.objective, init_from=str(tmp_path / "no")),
    )
    with pytest.raises(ValueError, match="spec.json is missing"):
        _run(missing, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "spec.json").write_text("{not json")
    (tmp_path / "bad" / "params.npz").write_bytes(b"")
    corrupt = dataclasses.replace(
        start,
        objective=dataclasses.replace(start.objective, init_from=str(tmp_path / "bad")),
    )
    with pytest.raises(ValueError, match="not valid JSON"):
        _run(corrupt, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


class PoisonedTrainer(_REAL_TRAINER):
    """Rewards turn NaN from meta-step `POISON_FROM` on (0-based: the state's step)."""

    POISON_FROM = 3

    def _meta_step(self, state):
        # Read by the poisoned rollout while this meta-step is traced.
        self._poisoned = state.step >= self.POISON_FROM
        return super()._meta_step(state)

    def _make_group(self, *args, **kwargs):
        group = super()._make_group(*args, **kwargs)
        clean_rollout = group.problem.rollout

        def rollout(params, env_carry, key):
            trajectory, env_carry, stats = clean_rollout(params, env_carry, key)
            rewards = jnp.where(self._poisoned, jnp.nan, trajectory.rewards)
            return trajectory._replace(rewards=rewards), env_carry, stats

        problem = dataclasses.replace(group.problem, rollout=rollout)
        return dataclasses.replace(group, problem=problem)


@pytest.fixture(scope="module")
def poisoned_trainer():
    return PoisonedTrainer(_config())


def test_poisoned_meta_step_changes_nothing_and_counts(poisoned_trainer):
    trainer = poisoned_trainer
    state = trainer.init(0)
    state = state._replace(step=jnp.asarray(PoisonedTrainer.POISON_FROM, jnp.int32))
    before = jax.device_get(metarl.checkpoint.encode_keys(state))
    after, metrics = trainer.meta_step(state)
    after = jax.device_get(metarl.checkpoint.encode_keys(after))
    assert int(metrics["meta/skipped"]) == 1
    config = trainer.config
    agent_updates = config.meta.population_size * config.meta.inner_steps
    assert int(metrics["agent/skipped_updates"]) == agent_updates
    assert int(after.skipped) == 1
    _assert_bitwise_equal(before.meta_params, after.meta_params)
    _assert_bitwise_equal(before.meta_opt_state, after.meta_opt_state)
    _assert_bitwise_equal(
        before.population[0].inner.params, after.population[0].inner.params
    )
    _assert_bitwise_equal(
        before.population[0].inner.opt_state.inner_state,
        after.population[0].inner.opt_state.inner_state,
    )
    np.testing.assert_array_equal(
        after.population[0].inner.opt_state.skipped,
        before.population[0].inner.opt_state.skipped + config.meta.inner_steps,
    )


def test_nan_run_skips_logs_and_stops_keeping_last_good_checkpoint(
    tmp_path, poisoned_trainer, monkeypatch, capsys
):
    monkeypatch.setattr(metarl.trainer, "Trainer", lambda config: poisoned_trainer)
    config = _config(steps=10, every=2)
    config = dataclasses.replace(
        config, meta=dataclasses.replace(config.meta, max_consecutive_skips=3)
    )
    run_dir = tmp_path / "nan"
    with pytest.raises(RunStopped) as stopped:
        _run(config, run_dir)
    assert stopped.value.exit_code == 3
    message = str(stopped.value)
    assert message.startswith("stopped at meta-step 6: 3 meta-updates in a row")
    assert "last good checkpoint is meta-step 2" in message
    assert "\n" not in message

    # Meta-steps 4-6 were poisoned: skipped, counted and logged.
    records = {r["meta_step"]: r for r in read_metrics(run_dir)}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    per_step = config.meta.population_size * config.meta.inner_steps
    for step in (1, 2, 3):
        assert records[step]["meta/skipped"] == 0
        assert records[step]["agent/skipped_updates"] == 0
    for step in (4, 5, 6):
        assert records[step]["meta/skipped"] == 1
        assert records[step]["agent/skipped_updates"] == per_step
        assert records[step]["meta/loss"] is None  # NaN, written as null
    assert records[6]["meta/skipped_total"] == 3
    assert records[6]["agent/skipped_updates_total"] == 3 * per_step
    out = capsys.readouterr().out
    assert "no checkpoint at meta-step 4: 1 meta-update(s) in a row skipped" in out
    assert "skipped 1 meta, 4 agent updates" in out

    # The checkpoint before the NaNs is the newest, intact, and finite.
    assert Checkpointer(run_dir).steps() == [2]
    state, _ = _final_state(run_dir, config)
    assert int(state.step) == 2
    assert load_objective(run_dir / "objective").spec["meta_step"] == 2


def test_sigterm_saves_checkpoint_and_resume_completes(
    tmp_path, finished_run, shared_trainers, monkeypatch
):
    config, full_dir = finished_run
    trainer = shared_trainers(config)
    compiled = trainer.meta_step

    def meta_step_then_sigterm(state):
        out = compiled(state)
        if int(out[0].step) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    run_dir = tmp_path / "term"
    monkeypatch.setattr(trainer, "meta_step", meta_step_then_sigterm)
    with pytest.raises(RunStopped) as stopped:
        _run(config, run_dir)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert "after meta-step 3; the last checkpoint is meta-step 3" in str(stopped.value)
    assert Checkpointer(run_dir).steps() == [2, 3]

    monkeypatch.setattr(trainer, "meta_step", compiled)
    _run(dataclasses.replace(config, resume=True), run_dir)
    _assert_bitwise_equal(
        _final_state(full_dir, config)[0], _final_state(run_dir, config)[0]
    )


class _FakeRun:
    """Stands in for a W&B run; `fail_on` names the method that raises."""

    def __init__(self, fail_on=None, **kwargs):
        self.id = "fake123"
        self.dir = "/nonexistent/files"
        self.kwargs = kwargs
        self.fail_on = fail_on
        self.calls = []

    def _record(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        if name == self.fail_on:
            raise ConnectionError("W&B is down\nsecond line")

    def define_metric(self, *args, **kwargs):
        self._record("define_metric", *args, **kwargs)

    def log(self, *args, **kwargs):
        self._record("log", *args, **kwargs)

    def log_artifact(self, *args, **kwargs):
        self._record("log_artifact", *args, **kwargs)

    def finish(self):
        self._record("finish")


def _wandb_run(tmp_path, monkeypatch, fail_on=None, init_error=None):
    import wandb

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    runs = []

    def init(**kwargs):
        if init_error is not None:
            raise init_error
        runs.append(_FakeRun(fail_on, **kwargs))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    config = dataclasses.replace(
        _config(), logger=LoggerConfig(mode="offline", log_every=1)
    )
    _run(config, tmp_path / "wb")
    return runs, read_metrics(tmp_path / "wb")


def test_wandb_gets_grouped_metrics_charts_and_objective_artifacts(
    tmp_path, shared_trainers, monkeypatch, capsys
):
    (wandb_run,), records = _wandb_run(tmp_path, monkeypatch)
    assert wandb_run.kwargs["mode"] == "offline"
    assert wandb_run.kwargs["config"]["meta"]["steps"] == 6
    metric_defs = {c[1][0]: c[2] for c in wandb_run.calls if c[0] == "define_metric"}
    assert metric_defs["episode/*"] == {"step_metric": "env_steps"}
    assert metric_defs["objective/*"] == {"step_metric": "meta_step"}
    logged = [c[1][0] for c in wandb_run.calls if c[0] == "log"]
    metrics = [p for p in logged if "meta_step" in p]
    # Streamed as the run goes, one payload per record, grouped by prefix.
    assert [p["meta_step"] for p in metrics] == [r["meta_step"] for r in records]
    for group in ("meta/", "agent/", "episode/", "perf/", "loss/", "objective/"):
        assert any(k.startswith(group) for k in metrics[-1]), group
    charts = [p for p in logged if "charts/objective" in p]
    assert len(charts) == 3  # at the checkpoints of meta-steps 2, 4 and 6
    assert "charts/learning_curve" in charts[-1]
    artifacts = [c for c in wandb_run.calls if c[0] == "log_artifact"]
    assert [c[2]["aliases"][1] for c in artifacts] == [
        "meta-step-2",
        "meta-step-4",
        "meta-step-6",
    ]
    assert set(artifacts[-1][1][0].manifest.entries) == {"spec.json", "params.npz"}
    assert "W&B" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "fail_on, init_error, what",
    [
        ("log", None, "logging"),
        ("log_artifact", None, "artifact"),
        (None, RuntimeError("no W&B here"), "start"),
    ],
)
def test_failing_wandb_is_reported_once_and_run_goes_on(
    tmp_path, shared_trainers, monkeypatch, capsys, fail_on, init_error, what
):
    runs, records = _wandb_run(tmp_path, monkeypatch, fail_on, init_error)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "W&B" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"metarl: W&B {what} failed (")
    assert warnings[0].endswith("continuing with local logs only")
    # The local record is complete, and W&B was not called again.
    assert [r["meta_step"] for r in records] == [1, 2, 3, 4, 5, 6]
    if runs:
        failures = [c for c in runs[0].calls if c[0] == fail_on]
        assert len(failures) == 1
        assert runs[0].calls[-1][0] == fail_on
    assert json.loads(json.dumps(records))


def test_resume_may_lower_learning_rates_and_says_so(finished_run):
    config, full_dir = finished_run
    checkpointer = Checkpointer(full_dir)
    rate = config.meta.learning_rate
    lower = dataclasses.replace(
        config, meta=dataclasses.replace(config.meta, learning_rate=rate / 2)
    )
    assert checkpointer.check_resumable(6, lower) == [
        f"meta.learning_rate: {rate} -> {rate / 2}"
    ]
    assert checkpointer.check_resumable(6, config) == []
    wider = dataclasses.replace(
        config, agent=dataclasses.replace(config.agent, hidden_sizes=(16,))
    )
    with pytest.raises(CheckpointError, match=r"agent.hidden_sizes=\[8\] but"):
        checkpointer.check_resumable(6, wider)
    checkpointer.close()


def test_resume_may_change_how_meta_gradients_are_computed(finished_run):
    config, full_dir = finished_run
    checkpointer = Checkpointer(full_dir)
    leaner = dataclasses.replace(
        config,
        meta=dataclasses.replace(
            config.meta, store_inner_grad=False, checkpoint_every=2, grad="autodiff"
        ),
    )
    assert checkpointer.check_resumable(6, leaner) == [
        "meta.checkpoint_every: 0 -> 2",
        "meta.grad: mixflow -> autodiff",
        "meta.store_inner_grad: True -> False",
    ]
    checkpointer.close()
