"""Real commands: SIGKILL a run, resume it, and compare with a run left alone.

The three runs share a compilation cache (and a lower XLA optimisation level,
the same for all three) so that only the first one pays for compiling.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from helpers import TINY_TRAIN_ARGS, snapshot_files

from metarl.checkpoint import CHECKPOINT_DIR, Checkpointer, encode_keys
from metarl.config import MetaConfig, TrainConfig, from_dict
from metarl.logger import read_metrics
from metarl.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RUN = [
    *TINY_TRAIN_ARGS,
    "meta.steps=60",
    "logger.log_every=10",
    "logger.mode=disabled",
    "checkpoint.every=5",
    "checkpoint.keep=2",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        WANDB_MODE="offline",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        XLA_FLAGS="--xla_backend_optimization_level=0",
    )


def _command(args):
    return [sys.executable, "-m", "metarl.train", *args]


def _train(args, env, cwd):
    return subprocess.run(
        _command(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _final_state(run_dir: Path):
    config = from_dict(
        TrainConfig, yaml.safe_load((run_dir / "config.yaml").read_text())
    )
    checkpointer = Checkpointer(run_dir)
    try:
        step = checkpointer.latest_step()
        state, counters = checkpointer.restore(step, Trainer(config).init(config.seed))
    finally:
        checkpointer.close()
    return state, counters


def _kill_while_saving(args, env, cwd, run_dir, step):
    """Starts a run and SIGKILLs it while it writes the checkpoint of `step`.

    The progress line of `step` is printed just before its checkpoint is
    written; the kill comes as soon as orbax's temporary folder for it
    appears, so it lands in the middle of the write.
    """
    process = subprocess.Popen(
        _command(args),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    )
    lines = []
    tmp = run_dir / CHECKPOINT_DIR / f"{step}.orbax-checkpoint-tmp"
    try:
        for line in process.stdout:
            lines.append(line.rstrip())
            if line.startswith(f"meta-step {step:>5}/"):
                deadline = time.monotonic() + 30
                while not tmp.exists() and time.monotonic() < deadline:
                    time.sleep(0.001)
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        process.stdout.close()
        process.wait(timeout=60)
    return process.returncode, lines


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("kill")
    reference = _train([*RUN, f"hydra.run.dir={root / 'reference'}"], env, root)
    assert reference.returncode == 0, reference.stderr

    run_dir = root / "killed"
    code, lines = _kill_while_saving(
        [*RUN, f"hydra.run.dir={run_dir}"], env, root, run_dir, step=30
    )
    leftovers = sorted(
        p.name for p in (run_dir / CHECKPOINT_DIR).glob("*.orbax-checkpoint-tmp")
    )
    complete = Checkpointer(run_dir).steps()
    resumed = _train([f"resume={run_dir}"], env, root)
    assert resumed.returncode == 0, resumed.stderr
    return {
        "reference": root / "reference",
        "run_dir": run_dir,
        "kill_code": code,
        "killed_output": lines,
        "leftovers": leftovers,
        "complete": complete,
        "resumed": resumed,
    }


def test_sigkilled_run_resumes_to_bitwise_same_meta_parameters(killed_and_resumed):
    info = killed_and_resumed
    assert info["kill_code"] == -signal.SIGKILL
    assert not any(line.startswith("metarl: done") for line in info["killed_output"])
    assert info["complete"] and max(info["complete"]) < 60
    resumed_from = max(info["complete"])
    # A kill mid-save leaves orbax's temporary folder, never a broken checkpoint;
    # the resumed run writes that meta-step again and the folder goes.
    assert info["leftovers"] in ([], [f"{resumed_from + 5}.orbax-checkpoint-tmp"])
    assert not list((info["run_dir"] / CHECKPOINT_DIR).glob("*.orbax-checkpoint-tmp"))
    assert f"resuming from meta-step {resumed_from}" in info["resumed"].stdout

    reference_state, reference_counters = _final_state(info["reference"])
    resumed_state, resumed_counters = _final_state(info["run_dir"])
    assert int(resumed_state.step) == 60
    leaves = list(
        zip(
            jax.tree.leaves(encode_keys(reference_state)),
            jax.tree.leaves(encode_keys(resumed_state)),
            strict=True,
        )
    )
    for ref, res in leaves:
        assert np.asarray(ref).tobytes() == np.asarray(res).tobytes()
    assert resumed_counters.env_steps == reference_counters.env_steps
    reference_params = reference_state.meta_params
    resumed_params = resumed_state.meta_params
    assert (info["run_dir"] / "objective" / "params.npz").read_bytes() == (
        info["reference"] / "objective" / "params.npz"
    ).read_bytes()

    # Every meta-step is logged once, with the uninterrupted run's numbers.
    def deterministic(records):
        return [
            {
                k: v
                for k, v in r.items()
                if not k.startswith("perf/") or k == "perf/env_steps"
            }
            for r in records
        ]

    reference_records = read_metrics(info["reference"])
    resumed_records = read_metrics(info["run_dir"])
    # A record every 10 meta-steps and at each checkpoint (every 5).
    assert [r["meta_step"] for r in resumed_records] == list(range(5, 61, 5))
    assert deterministic(resumed_records) == deterministic(reference_records)
    print(
        f"\nkilled with SIGKILL (exit {info['kill_code']}) after the line "
        f"'{info['killed_output'][-1][:22]}'; complete checkpoints left: "
        f"{info['complete']}; temporary folders left: {info['leftovers']}; "
        f"resumed from meta-step {resumed_from} to 60; final meta-parameters "
        "bitwise equal to the uninterrupted run: "
        + ", ".join(
            f"{k}={float(resumed_params[k]):.9g} (reference "
            f"{float(reference_params[k]):.9g})"
            for k in sorted(resumed_params)
        )
        + f"; all {len(leaves)} state arrays equal; "
        f"{len(resumed_records)} metric records equal"
    )


def test_incompatible_resume_command_is_refused_and_writes_nothing(
    killed_and_resumed, env
):
    run_dir = killed_and_resumed["run_dir"]
    before = snapshot_files(run_dir)
    result = _train(
        [f"resume={run_dir}", "meta.steps=400", "agent.num_envs=8"], env, run_dir
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"metarl: error: cannot resume {run_dir}: it was trained with "
        "agent.num_envs=4 but this run has agent.num_envs=8; drop that override to "
        "resume, or start a new run in another directory"
    )
    assert snapshot_files(run_dir) == before


def test_unknown_option_is_one_line_without_hydra_traceback(tmp_path, env):
    result = _train(["meta.foo=1"], env, tmp_path)
    assert result.returncode == 2
    settings = ", ".join(sorted(f.name for f in dataclasses.fields(MetaConfig)))
    assert result.stderr.strip().splitlines() == [
        "metarl: error: unknown setting meta.foo; valid settings under 'meta': "
        + settings
    ]
    assert list(tmp_path.iterdir()) == []
