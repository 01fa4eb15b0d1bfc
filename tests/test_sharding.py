"""The population split over devices and processes.

Devices are simulated with `--xla_force_host_platform_device_count`, which
must be set before JAX starts, so the multi-device checks run in subprocesses:
`sharded_worker.py` on four devices, a two-process `jax.distributed` run of
`python -m metarl.train` on loopback, and a run whose population does not
divide over the devices. All are started together, since each spends most of
its time compiling on one core.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from metarl.config import ConfigError, DistributedConfig, TrainConfig, from_dict
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


def _environment(devices: int) -> dict[str, str]:
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
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts every subprocess at once; returns `name -> (rc, stdout, stderr, cwd)`."""
    port = _free_port()
    distributed = [
        "distributed.enabled=true",
        f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2",
    ]
    commands = {
        "worker": ([str(REPO / "tests" / "sharded_worker.py")], 4),
        "uneven": (
            ["-m", "metarl.train", *TINY_RUN, "meta.population_size=6"],
            4,
        ),
        **{
            f"process{i}": (
                [
                    "-m",
                    "metarl.train",
                    *TINY_RUN,
                    "meta.population_size=4",
                    "logger.mode=offline",
                    *distributed,
                    f"distributed.process_id={i}",
                ],
                2,
            )
            for i in range(2)
        },
    }
    started = {}
    try:
        for name, (args, devices) in commands.items():
            cwd = tmp_path_factory.mktemp(name)
            started[name] = (
                subprocess.Popen(
                    [sys.executable, *args],
                    cwd=cwd,
                    env=_environment(devices),
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
    assert "1 agent(s) on each of 4 cpu device(s), 2 process(es)" in out0
    assert "meta-step     2/2" in out0
    assert "metarl:" not in out1 and "meta-step" not in out1

    # Process 0 wrote the run; process 1 wrote nothing at all.
    (run_dir,) = {p.parent for p in cwd0.rglob("metrics.jsonl")}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["meta_step"] for r in records] == [1, 2]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "objective" / "params.npz").is_file()
    assert (run_dir / "wandb").is_dir()
    assert list(cwd1.rglob("*")) == []


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
