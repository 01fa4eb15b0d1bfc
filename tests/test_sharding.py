"""The population split over devices and processes.

Devices are simulated with `--xla_force_host_platform_device_count`, which
must be set before JAX starts, so the multi-device checks run in subprocesses:
`sharded_worker.py` on four devices, a two-process `jax.distributed` run of
`python -m metarl.train` on loopback that keeps checkpoints, and a run whose
population does not divide over the devices. All are started together, since
each spends most of its time compiling on one core. Then two more pairs of
processes resume the two-process run from its first checkpoint, and refuse
to resume it with a changed setting.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import TINY_TRAIN_ARGS, snapshot_files

from metarl.checkpoint import (
    CHECKPOINT_DIR,
    Checkpointer,
    config_record,
    resumed_settings,
)
from metarl.config import ConfigError, DistributedConfig, TrainConfig, from_dict
from metarl.logger import read_metrics
from metarl.sharding import agent_keys, check_population_size

REPO = Path(__file__).resolve().parent.parent
# Only against hangs: on a shared 2-core machine the runs take 1 to 4 minutes.
TIMEOUT_S = 900
TINY_RUN = [
    "env=catch",
    "agent.num_envs=2",
    "agent.unroll_length=4",
    "agent.hidden_sizes=[8]",
    "meta.inner_steps=2",
    "meta.steps=2",
    "logger.log_every=1",
]
# Two processes of one device each, one agent each, checkpoints at 2 and 4.
TWO_PROCESS_RUN = [
    *TINY_TRAIN_ARGS,
    "meta.steps=4",
    "checkpoint.every=2",
    "logger.log_every=1",
    "logger.mode=offline",
]


def _environment(devices: int, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    # These programs run for milliseconds and compile for tens of seconds;
    # without LLVM's optimisations they compile in about half the time.
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0"
    )
    env["WANDB_MODE"] = "offline"
    env["WANDB_SILENT"] = "true"
    env.pop("JAX_ENABLE_X64", None)
    # Process 0 of the resumed run loads the first run's programs from here.
    # Process 1 compiles again: JAX writes entries from process 0 only, and
    # the keys of a program differ between processes.
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_processes(name: str, args: list[str]) -> dict[str, tuple[list[str], int]]:
    """`python -m metarl.train ARGS` as processes 0 and 1 of one run on loopback."""
    distributed = [
        "distributed.enabled=true",
        f"distributed.coordinator_address=127.0.0.1:{_free_port()}",
        "distributed.num_processes=2",
    ]
    return {
        f"{name}{i}": (
            ["-m", "metarl.train", *args, *distributed, f"distributed.process_id={i}"],
            1,
        )
        for i in range(2)
    }


def _run_all(commands, tmp_path_factory, cache: Path) -> dict:
    """Starts every command at once, each in a new folder; waits for them all.

    Returns:
      `name -> (returncode, stdout, stderr, cwd)`.
    """
    started = {}
    try:
        for name, (args, devices) in commands.items():
            cwd = tmp_path_factory.mktemp(name)
            started[name] = (
                subprocess.Popen(
                    [sys.executable, *args],
                    cwd=cwd,
                    env=_environment(devices, cache),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
                cwd,
            )
        results = {}
        deadline = time.monotonic() + TIMEOUT_S
        for name, (process, cwd) in started.items():
            out, err = process.communicate(timeout=max(1, deadline - time.monotonic()))
            results[name] = (process.returncode, out, err, cwd)
        return results
    finally:
        for process, _ in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, compile_cache):
    """Starts every subprocess at once; returns `name -> (rc, stdout, stderr, cwd)`."""
    commands = {
        "worker": ([str(REPO / "tests" / "sharded_worker.py")], 4),
        "uneven": (
            ["-m", "metarl.train", *TINY_RUN, "meta.population_size=6"],
            4,
        ),
        **_two_processes("process", TWO_PROCESS_RUN),
    }
    return _run_all(commands, tmp_path_factory, compile_cache)


def _run_dir(runs) -> Path:
    (run_dir,) = {p.parent for p in runs["process0"][3].rglob("metrics.jsonl")}
    return run_dir


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory, compile_cache):
    """Two copies of the two-process run, cut back to its checkpoint at 2.

    Two processes resume one copy; two more try to resume the other with a
    changed setting, which they must refuse. Both pairs run at once.
    """
    for name in ("process0", "process1"):
        assert runs[name][0] == 0, f"{name}: {runs[name][2][-3000:]}"
    root = tmp_path_factory.mktemp("copies")
    resume_dir, refuse_dir = root / "resume", root / "refuse"
    shutil.copytree(_run_dir(runs), resume_dir)
    # As if the run was killed while it wrote its checkpoint of meta-step 4.
    checkpoints = resume_dir / CHECKPOINT_DIR
    shutil.rmtree(checkpoints / "4")
    junk = checkpoints / "4.orbax-checkpoint-tmp" / "state"
    junk.mkdir(parents=True)
    (junk / "half-written").write_bytes(b"\x00" * 100)
    shutil.copytree(resume_dir, refuse_dir)
    before = snapshot_files(refuse_dir)
    commands = {
        **_two_processes("resume", [f"resume={resume_dir}", "logger.mode=disabled"]),
        **_two_processes("refuse", [f"resume={refuse_dir}", "agent.num_envs=8"]),
    }
    results = _run_all(commands, tmp_path_factory, compile_cache)
    return results, resume_dir, refuse_dir, before


@pytest.fixture(scope="module")
def worker(runs):
    rc, out, err, _ = runs["worker"]
    assert rc == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_sharded_meta_step_matches_one_device_float64(worker):
    assert worker["devices"] == 4
    # The same seed builds the same agents on four devices and on one.
    assert max(worker["init_errors"]) == 0.0
    # Adam's first moment after one step is 0.1 times the meta-gradient.
    assert worker["grad_norm"] > 0
    np.testing.assert_allclose(
        worker["grad_norm_from_adam"], worker["grad_norm"], rtol=1e-10
    )
    assert len(worker["grad_errors"]) == 4
    assert max(worker["grad_errors"]) < 1e-10
    assert max(worker["metric_errors"].values()) < 1e-10
    assert max(worker["population_errors"]) < 1e-10


@pytest.mark.parametrize("when", ["init", "step"])
def test_population_split_and_meta_state_replicated(worker, when):
    for leaf in worker[f"{when}_population"]:
        assert leaf["spec"] == "P('agents',)"
        assert not leaf["fully_replicated"]
        assert leaf["shape"][0] == 8
        assert sorted(s["device"] for s in leaf["shards"]) == [0, 1, 2, 3]
        assert sorted(s["start"] for s in leaf["shards"]) == [0, 2, 4, 6]
        assert {s["size"] for s in leaf["shards"]} == {2}
    for leaf in worker[f"{when}_replicated"]:
        assert leaf["spec"] == "P()"
        assert leaf["fully_replicated"]
        assert sorted(s["device"] for s in leaf["shards"]) == [0, 1, 2, 3]


def test_metrics_are_averaged_over_all_devices(worker):
    assert worker["metrics_devices"] == [0, 1, 2, 3]


def test_first_step_actions_differ_between_devices(worker):
    assert len(worker["actions"]) == 4
    assert worker["actions_differ"]
    # The comparison does see identical agents: copies of one agent act alike.
    assert not worker["clone_actions_differ"]


def test_population_not_dividing_devices_is_config_error(worker, runs):
    message = worker["uneven_error"]
    assert message is not None
    assert "meta.population_size=6" in message and "4 devices" in message
    assert "meta.population_size=4 or 8" in message

    rc, out, err, _ = runs["uneven"]
    assert rc == 2
    assert err.strip().splitlines() == [f"metarl: error: {message}"]
    assert "compiling" not in out


def test_two_processes_on_loopback_only_process_zero_writes(runs):
    for name in ("process0", "process1"):
        rc, _, err, _ = runs[name]
        assert rc == 0, f"{name}: {err[-3000:]}"
    _, out0, _, cwd0 = runs["process0"]
    _, out1, _, cwd1 = runs["process1"]

    # One run over the devices of both processes.
    assert "1 agent(s) on each of 2 cpu device(s), 2 process(es)" in out0
    assert "meta-step     4/4" in out0
    assert "metarl: checkpoint saved at meta-step 2" in out0
    assert "metarl:" not in out1 and "meta-step" not in out1

    # Process 0 wrote the run and its checkpoints; process 1 wrote nothing.
    run_dir = _run_dir(runs)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["meta_step"] for r in records] == [1, 2, 3, 4]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "objective" / "params.npz").is_file()
    assert (run_dir / "wandb").is_dir()
    assert Checkpointer(run_dir).steps() == [2, 4]
    assert list(cwd1.rglob("*")) == []


def _saved_arrays(run_dir: Path, step: int) -> list[np.ndarray]:
    """The arrays of checkpoint `step`, as saved, without building a trainer."""
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(run_dir / CHECKPOINT_DIR / str(step) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _saved_counters(run_dir: Path, step: int) -> dict:
    """The host counters of checkpoint `step`, without the wall time."""
    counters = Checkpointer(run_dir).read_host(step)["counters"]
    del counters["wall_seconds"]
    return counters


def _deterministic(records):
    """Metric records without wall-clock measurements."""
    return [
        {k: v for k, v in r.items() if not k.startswith("perf/") or k.endswith("steps")}
        for r in records
    ]


def test_two_processes_resume_to_the_uninterrupted_run_bitwise(runs, resumed):
    results, resume_dir, _, _ = resumed
    for name in ("resume0", "resume1"):
        rc, _, err, _ = results[name]
        assert rc == 0, f"{name}: {err[-3000:]}"
    _, out0, _, _ = results["resume0"]
    _, out1, _, cwd1 = results["resume1"]
    assert "resuming from meta-step 2" in out0
    assert "meta-step     4/4" in out0
    assert "metarl:" not in out1
    assert list(cwd1.rglob("*")) == []

    # Process 0 wrote meta-step 4 again; orbax's temporary folder is gone.
    assert Checkpointer(resume_dir).steps() == [2, 4]
    assert not list((resume_dir / CHECKPOINT_DIR).glob("*.orbax-checkpoint-tmp"))

    # Every array of the state, and the objective file, as if never stopped.
    uninterrupted_dir = _run_dir(runs)
    uninterrupted = _saved_arrays(uninterrupted_dir, 4)
    resumed_arrays = _saved_arrays(resume_dir, 4)
    assert len(resumed_arrays) == len(uninterrupted) > 10
    for a, b in zip(uninterrupted, resumed_arrays, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    counters = _saved_counters(resume_dir, 4)
    assert counters == _saved_counters(uninterrupted_dir, 4)
    assert counters["env_steps"] == 384
    assert (resume_dir / "objective" / "params.npz").read_bytes() == (
        uninterrupted_dir / "objective" / "params.npz"
    ).read_bytes()
    assert _deterministic(read_metrics(resume_dir)) == _deterministic(
        read_metrics(uninterrupted_dir)
    )


def test_two_processes_refuse_an_incompatible_resume_and_write_nothing(resumed):
    results, _, refuse_dir, before = resumed
    message = (
        f"metarl: error: cannot resume {refuse_dir}: it was trained with "
        "agent.num_envs=4 but this run has agent.num_envs=8; drop that override to "
        "resume, or start a new run in another directory"
    )
    for name in ("refuse0", "refuse1"):
        rc, out, err, cwd = results[name]
        assert rc == 2, f"{name}: {err[-3000:]}"
        assert err.strip().splitlines()[-1] == message
        assert "compiling" not in out
        assert list(cwd.rglob("*")) == []
    assert snapshot_files(refuse_dir) == before


def test_resuming_takes_distributed_settings_from_the_command(runs):
    # The two-process run saved distributed.enabled=true and its coordinator;
    # a command that resumes it on one process must not inherit them.
    command = config_record(from_dict(TrainConfig, {"meta": {"steps": 9}}))
    merged = resumed_settings(_run_dir(runs), command, ["meta.steps"])
    assert merged["distributed"] == command["distributed"]
    assert merged["distributed"]["enabled"] is False
    assert merged["meta"]["steps"] == 9
    assert merged["agent"]["num_envs"] == 4


def test_agent_keys_distinct_and_reproducible():
    keys = jax.random.key_data(agent_keys(3, 8))
    assert len({tuple(k) for k in np.asarray(keys).tolist()}) == 8
    np.testing.assert_array_equal(keys, jax.random.key_data(agent_keys(3, 8)))
    # The first agents are the same whatever the population size.
    np.testing.assert_array_equal(keys[:4], jax.random.key_data(agent_keys(3, 4)))
    assert not np.array_equal(keys, jax.random.key_data(agent_keys(4, 8)))


@pytest.mark.parametrize(
    "population, devices, sizes",
    [(6, 4, "4 or 8"), (2, 4, "4"), (9, 8, "8 or 16"), (5, 2, "4 or 6")],
)
def test_uneven_population_names_sizes_that_work(population, devices, sizes):
    check_population_size(devices * 3, devices)
    with pytest.raises(ConfigError) as error:
        check_population_size(population, devices)
    assert str(error.value).endswith(f"meta.population_size={sizes}")


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"process_id": 1}, "distributed.process_id set but"),
        (
            {"enabled": True, "num_processes": 2, "process_id": 2},
            "distributed.process_id must lie in [0, distributed.num_processes)",
        ),
        ({"enabled": True, "num_processes": 0}, "num_processes must be positive"),
        ({"enabled": True, "process_id": -1}, "process_id must lie in"),
    ],
)
def test_distributed_settings_are_checked(settings, fragment):
    with pytest.raises(ConfigError, match="distributed") as error:
        from_dict(TrainConfig, {"distributed": settings})
    assert fragment in str(error.value)


def test_distributed_defaults_run_one_process():
    config = from_dict(TrainConfig, {})
    assert config.distributed == DistributedConfig(enabled=False)
