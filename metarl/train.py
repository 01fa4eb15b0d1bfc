"""`python -m metarl.train`: meta-learn an objective, Hydra-style overrides.

Examples:

  python -m metarl.train env=breakout
  python -m metarl.train env=asterix meta.inner_steps=64 agent.num_envs=128
  python -m metarl.train objective=learned_targets env=[breakout,asterix] \
      agent.optimizer.learning_rate=[1e-3,3e-4] meta.lifetime=[2048,4096] \
      meta.population_size=8
  python -m metarl.train resume=outputs/2026-01-01/12-00-00 meta.steps=3000

Writes to the Hydra run directory: `config.yaml` (resolved), `metrics.jsonl`,
a W&B run under `wandb/` (offline unless `logger.mode=online`), orbax
checkpoints of the whole training state under `checkpoints/` and the learned
objective under `objective/`, which `metarl.load_objective` reads back.
Ctrl-C or SIGTERM stops after the current meta-step with a checkpoint;
`resume=true` (in the same `hydra.run.dir`) or `resume=RUN_DIR` continues.

Exit status: 0 done, 2 bad input (nothing written), 3 stopped because
meta-updates kept coming out non-finite, 128 + signal number when stopped by
a signal.
"""

import sys
from pathlib import Path

import hydra
import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from metarl import distributed
from metarl.checkpoint import (
    Checkpointer,
    CheckpointError,
    HostCounters,
    find_run,
    resume_notice,
    resumed_settings,
)
from metarl.cli import (
    check_overrides,
    compose_config,
    config_dir,
    expand_env_list,
    fail,
    override_keys,
    quiet_backend_probing,
)
from metarl.config import ConfigError, TrainConfig, from_dict
from metarl.export import ObjectiveFileError, load_objective, save_objective
from metarl.guard import RunStopped, SkipStreak
from metarl.interrupt import StopSignals
from metarl.logger import NullLogger, RunLogger, rewind_metrics, wandb_mode
from metarl.progress import Progress, console_line, env_of

CONFIG_GROUPS = (
    "env",
    "agent",
    "objective",
    "meta",
    "logger",
    "checkpoint",
    "distributed",
)

# Exit status of a run stopped because its meta-updates kept being skipped.
DIVERGED_EXIT_CODE = 3


def _episode_means(totals: dict, prefix: str) -> dict:
    """Mean return and length of the episodes tallied under `prefix`."""
    count = totals[f"{prefix}/count"]
    nan = float("nan")
    return {
        f"{prefix}/return": totals[f"{prefix}/return_sum"] / count if count else nan,
        f"{prefix}/length": totals[f"{prefix}/length_sum"] / count if count else nan,
        f"{prefix}/count": count,
    }


def _summarise(window: list[dict], objective_values: dict[str, float]) -> dict:
    """One record for a batch of meta-steps: means, and returns over episodes.

    Each environment of a population of several gets its own
    `episode/<env>/return`, since returns of different games do not compare.
    """
    totals = {k: float(np.sum([m[k] for m in window])) for k in window[0]}
    record = _episode_means(totals, "episode")
    for key in totals:
        if env_of(key, "count"):
            record.update(_episode_means(totals, f"episode/{env_of(key, 'count')}"))
    for key in ("meta/skipped", "agent/resets", "agent/skipped_updates"):
        record[key] = totals[key]
    for key in window[0]:
        if key.startswith(("meta/loss", "meta/grad_norm", "loss/")):
            record[key] = totals[key] / len(window)
    record.update({f"objective/{k}": v for k, v in objective_values.items()})
    return record


def describe_population(trainer) -> str:
    """Who is in the population: per environment, agents, rates and lifetimes."""

    def values(items) -> str:
        return ", ".join(f"{v:g}" for v in dict.fromkeys(items))

    return "; ".join(
        f"{g.env_name} {g.size} agent{'s' if g.size > 1 else ''} "
        f"(learning rates {values(g.learning_rates)}; "
        f"lifetimes {values(g.lifetimes)})"
        for g in trainer.groups
    )


def _initial_state(trainer, checkpointer: Checkpointer, config: TrainConfig, run_dir):
    """The state a run starts from: fresh, from a saved objective, or resumed.

    Returns:
      `(state, counters)`.

    Raises:
      CheckpointError: if there is no checkpoint to resume, or it is damaged
        or was written by an incompatible configuration, or the processes of
        the run see different checkpoints.
      ObjectiveFileError: if `objective.init_from` is not a usable objective.
    """
    if config.resume is False:
        state = trainer.init(config.seed)
        return _from_saved_objective(trainer, state, config), HostCounters()
    steps = checkpointer.steps()
    # Every process restores its own part of the state from the same folder;
    # hosts that saw different checkpoints would resume different runs.
    newest = distributed.gather_ints(steps[-1] if steps else -1)
    if len(set(newest)) > 1:
        raise CheckpointError(
            f"cannot resume {run_dir}: its processes see different newest "
            f"checkpoints in {checkpointer.directory} (meta-steps "
            f"{', '.join(map(str, newest))} on processes 0 to {len(newest) - 1}); "
            "resuming a run of several processes needs a folder that every host "
            "shares"
        )
    if not steps:
        raise CheckpointError(
            f"resume: {checkpointer.directory} holds no complete checkpoint (the "
            "run stopped before its first one was written); start a new run"
        )
    step = steps[-1]
    changed = checkpointer.check_resumable(step, config)
    if step > config.meta.steps:
        raise CheckpointError(
            f"cannot resume {run_dir}: its checkpoint is at meta-step {step} but "
            f"meta.steps={config.meta.steps}; set meta.steps={step} or more"
        )
    # The template is built (and its program compiled) only once the
    # checkpoint has passed the checks that can refuse it.
    restored = checkpointer.restore(step, template=trainer.init(config.seed))
    for change in changed:
        print(resume_notice(change), flush=True)
    return restored


def _from_saved_objective(trainer, state, config: TrainConfig):
    """`state` with the meta-parameters of `objective.init_from`, if set."""
    path = config.objective.init_from
    if path is None:
        return state
    loaded = load_objective(path)
    if loaded.objective.name != config.objective.name:
        raise ObjectiveFileError(
            f"objective.init_from={path} is a '{loaded.objective.name}' objective "
            f"but objective.name={config.objective.name}; pick a matching one"
        )
    meta_params = jax.tree.map(lambda x: x.astype(trainer.dtype), loaded.meta_params)
    return state._replace(
        meta_params=meta_params,
        meta_opt_state=trainer.meta_optimizer.init(meta_params),
    )


def _diverged_message(step, config, last: int | None, directory: Path) -> str:
    where = (
        f"the last good checkpoint is meta-step {last} in {directory}"
        if last is not None
        else "no checkpoint was written before"
    )
    return (
        f"stopped at meta-step {step}: {config.meta.max_consecutive_skips} "
        "meta-updates in a row were skipped for non-finite meta-gradients "
        f"(meta.max_consecutive_skips); {where}; resuming it unchanged would "
        "diverge the same way, so resume=true with a lower meta.learning_rate or "
        "agent.optimizer.learning_rate, or start again with dtype=float64"
    )


def run(config: TrainConfig, run_dir: Path, resolved: dict) -> Path:
    """Meta-trains as `config` says and writes everything under `run_dir`.

    With `config.resume` set, continues the run in `run_dir` from its newest
    checkpoint and ends with the same meta-parameters as a run never stopped.
    Nothing in `run_dir` is written before the configuration, the checkpoint
    and any saved objective it reads have been checked.

    Args:
      config: the validated configuration.
      run_dir: where the metrics, checkpoints, W&B run and objective go.
      resolved: the configuration as plain values, for the record.

    Returns:
      The folder of the saved objective (written by process 0 only).

    Raises:
      ConfigError: for a W&B mode that does not exist, a population that does
        not split over the devices, or a distributed runtime that does not
        start.
      CheckpointError: for a checkpoint that cannot be resumed.
      ObjectiveFileError: for an `objective.init_from` that cannot be used.
      RunStopped: if too many meta-updates in a row were skipped, or a signal
        asked the run to stop (after saving a checkpoint).
    """
    from metarl.trainer import Trainer

    distributed.initialize(config.distributed)
    main_process = distributed.is_main_process()
    if config.resume is False:
        # The other processes' own folders stay empty; process 0's is the run's.
        run_dir = distributed.main_process_path(run_dir)
    meta, log_cfg, ckpt_cfg = config.meta, config.logger, config.checkpoint
    mode = wandb_mode(log_cfg.mode)
    trainer = Trainer(config)
    checkpointer = Checkpointer(run_dir, keep=ckpt_cfg.keep)
    state, counters = _initial_state(trainer, checkpointer, config, run_dir)
    start_step = int(state.step)
    objective_dir = run_dir / "objective"
    if start_step == meta.steps and config.resume is not False:
        print(
            f"metarl: the run in {run_dir} already reached meta.steps={meta.steps}; "
            "raise meta.steps to train further",
            flush=True,
        )
        checkpointer.close()
        return objective_dir

    # Everything has been checked; from here on the run writes to run_dir.
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_text = OmegaConf.to_yaml(OmegaConf.create(resolved))
        (run_dir / "config.yaml").write_text(config_text)
    history = rewind_metrics(run_dir, start_step) if start_step and main_process else []
    logger = (RunLogger if main_process else NullLogger)(
        run_dir,
        resolved,
        mode=mode,
        project=log_cfg.project,
        entity=log_cfg.entity,
        name=log_cfg.name,
        run_id=counters.wandb_id,
        history=history,
    )
    counters.wandb_id = logger.run_id or counters.wandb_id
    resumed = f" | resuming from meta-step {start_step}" if start_step else ""
    print(
        f"metarl: {','.join(config.env.names)} | population {meta.population_size} x "
        f"{config.agent.num_envs} envs | K={meta.inner_steps} inner updates of "
        f"{config.agent.unroll_length} steps | meta.grad={meta.grad} | "
        f"{meta.steps} meta-steps | run dir {run_dir}{resumed}",
        flush=True,
    )
    layout = trainer.layout
    print(
        f"metarl: {layout.agents_per_device} agent(s) on each of "
        f"{layout.num_devices} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)",
        flush=True,
    )
    if len(trainer.groups) > 1 or any(
        len(set(g.learning_rates)) > 1 or len(set(g.lifetimes)) > 1
        for g in trainer.groups
    ):
        print(f"metarl: population: {describe_population(trainer)}", flush=True)
    print("metarl: compiling the meta-step ...", flush=True)
    progress = Progress(meta.steps, start_step, trainer.env_steps_per_meta_step)
    streak = SkipStreak(meta.max_consecutive_skips, counters.skip_streak)
    wall_before = counters.wall_seconds
    window = []

    # Kept here rather than read from the folder: processes other than 0 go
    # on before process 0 has finished writing.
    last_saved = start_step or None

    def save_checkpoint(step: int) -> None:
        nonlocal last_saved
        counters.wall_seconds = wall_before + progress.session_seconds
        counters.skip_streak = streak.count
        # Every process takes part (the population is gathered from all of
        # them); process 0 alone writes.
        checkpointer.save(state, counters, config)
        last_saved = step
        if not main_process:
            return
        save_objective(
            objective_dir,
            trainer.objective,
            jax.device_get(state.meta_params),
            train_envs=list(config.env.names),
            meta_step=step,
        )
        logger.log_objective(objective_dir, step)
        logger.log_charts()
        print(f"metarl: checkpoint saved at meta-step {step}", flush=True)

    try:
        with StopSignals() as stop:
            for step in range(start_step + 1, meta.steps + 1):
                state, metrics = trainer.meta_step(state)
                window.append(metrics)
                # Reading the skip flag waits for the step, which also times it.
                streak.update(bool(metrics["meta/skipped"]))
                progress.step_done(step)
                counters.env_steps += trainer.env_steps_per_meta_step
                if step == start_step + 1:
                    print(
                        f"metarl: compiled and ran the first meta-step in "
                        f"{progress.session_seconds:.1f}s",
                        flush=True,
                    )
                final = step == meta.steps
                checkpoint_due = final or (
                    ckpt_cfg.every and step % ckpt_cfg.every == 0
                )
                # The skip streak is the same on every process (it follows the
                # replicated meta-gradient); a signal may not be.
                signum = distributed.agreed_signal(stop.signum)
                stopping = streak.tripped or signum is not None
                if step % log_cfg.log_every == 0 or checkpoint_due or stopping:
                    record = _summarise(
                        jax.device_get(window),
                        trainer.objective.describe(jax.device_get(state.meta_params)),
                    )
                    window = []
                    counters.agent_skipped += int(record["agent/skipped_updates"])
                    rate, seconds_left = progress.report()
                    record["meta/skipped_total"] = int(state.skipped)
                    record["agent/skipped_updates_total"] = counters.agent_skipped
                    record["perf/env_steps"] = counters.env_steps
                    record["perf/env_steps_per_second"] = rate
                    record["perf/seconds_left"] = seconds_left
                    record["perf/wall_seconds"] = wall_before + progress.session_seconds
                    logger.log(record, step=step)
                    print(
                        console_line(
                            step,
                            meta.steps,
                            counters.env_steps,
                            rate,
                            seconds_left,
                            record,
                        ),
                        flush=True,
                    )
                if streak.tripped:
                    raise RunStopped(
                        _diverged_message(
                            step, config, last_saved, checkpointer.directory
                        ),
                        DIVERGED_EXIT_CODE,
                    )
                if checkpoint_due or signum is not None:
                    # A checkpoint amid skipped meta-updates could push the last
                    # good one out of the `checkpoint.keep` kept.
                    if streak.count and not final:
                        print(
                            f"metarl: no checkpoint at meta-step {step}: "
                            f"{streak.count} meta-update(s) in a row skipped",
                            flush=True,
                        )
                    else:
                        save_checkpoint(step)
                if signum is not None:
                    raise RunStopped(
                        f"stopped by signal {signum} after meta-step {step}; "
                        f"the last checkpoint is meta-step {last_saved}; continue with "
                        f"resume={run_dir}",
                        128 + signum,
                    )
    finally:
        logger.close()
        checkpointer.close()
    print(
        f"metarl: done in {progress.session_seconds:.1f}s; objective saved to "
        f"{objective_dir}",
        flush=True,
    )
    return objective_dir


def prepare(
    resolved: dict, hydra_dir: Path, overrides: list[str]
) -> tuple[TrainConfig, Path, dict]:
    """Checks a command's settings and finds the run directory, writing nothing.

    Args:
      resolved: the configuration Hydra composed, as plain values.
      hydra_dir: the run directory Hydra picked.
      overrides: the command-line overrides.

    Returns:
      `(config, run_dir, resolved)`; when resuming, the settings are the
      resumed run's with the command-line overrides on top.

    Raises:
      ConfigError: for a setting that is unknown, of the wrong type or
        out of range.
      CheckpointError: for a run that cannot be resumed, or a new run in a
        directory that holds one.
    """
    config = from_dict(TrainConfig, resolved)
    run_dir, resuming = find_run(config.resume, hydra_dir)
    if resuming:
        resolved = resumed_settings(run_dir, resolved, override_keys(overrides))
        config = from_dict(TrainConfig, resolved)
    return config, run_dir, resolved


def run_command(resolved: dict, hydra_dir: Path, overrides: list[str]) -> None:
    """Runs one command, turning what can go wrong into an exit status.

    Bad input exits with status 2 and a one-line message; a stopped run
    exits with the status `RunStopped` carries.

    Args:
      resolved: the configuration Hydra composed, as plain values.
      hydra_dir: the run directory Hydra picked.
      overrides: the command-line overrides.
    """
    try:
        config, run_dir, resolved = prepare(resolved, hydra_dir, overrides)
        with distributed.quiet_unless_main():
            run(config, run_dir, resolved)
    except (ConfigError, CheckpointError, ObjectiveFileError) as error:
        fail(str(error))
    except RunStopped as error:
        fail(str(error), error.exit_code)


def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_command(
        OmegaConf.to_container(cfg, resolve=True),
        Path(hydra_cfg.runtime.output_dir),
        list(hydra_cfg.overrides.task),
    )


def _resume_argv(argv: list[str]) -> list[str]:
    """`argv` with `hydra.run.dir` set to the run that `resume=PATH` continues.

    Without it Hydra would open a new, empty run directory beside the one
    being resumed.
    """
    paths = [
        a.split("=", 1)[1]
        for a in argv
        if a.startswith("resume=")
        and a.split("=", 1)[1].strip().lower() not in ("true", "false")
    ]
    if not paths or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    return [*argv, f"hydra.run.dir={paths[-1]}"]


def check_command(argv: list[str]) -> list[str]:
    """Checks a command line before Hydra creates anything; exits 2 if it is bad.

    Args:
      argv: the arguments after the program name.

    Returns:
      The arguments Hydra should run with.
    """
    argv = expand_env_list(argv)
    check_overrides(argv, CONFIG_GROUPS, TrainConfig)
    argv = _resume_argv(argv)
    try:
        config = from_dict(TrainConfig, compose_config(argv))
        run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
        if (
            isinstance(config.resume, str)
            and run_dirs
            and Path(run_dirs[-1]).absolute() != Path(config.resume).absolute()
        ):
            raise CheckpointError(
                f"resume={config.resume} and hydra.run.dir={run_dirs[-1]} name "
                "different run directories; pass only resume=RUN_DIR"
            )
        # A directory given literally can be checked now; one with ${...}
        # interpolations is only known once Hydra resolves it.
        if run_dirs and "${" not in run_dirs[-1]:
            find_run(config.resume, Path(run_dirs[-1]))
        elif config.resume is True:
            raise CheckpointError(
                "resume=true continues the run in hydra.run.dir; pass "
                "hydra.run.dir=RUN_DIR too, or resume=RUN_DIR"
            )
        wandb_mode(config.logger.mode)
        if config.objective.init_from is not None and config.resume is False:
            load_objective(config.objective.init_from)
    except (ConfigError, CheckpointError, ObjectiveFileError) as error:
        fail(str(error))
    return argv


def main() -> None:
    """Entry point of `python -m metarl.train`."""
    quiet_backend_probing()
    sys.argv[1:] = check_command(sys.argv[1:])
    try:
        sys.argv += distributed.start_from_argv(sys.argv[1:])
    except ConfigError as error:
        fail(str(error))
    hydra.main(version_base=None, config_path=str(config_dir()), config_name="config")(
        _main
    )()


if __name__ == "__main__":
    main()
