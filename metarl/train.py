"""`python -m metarl.train`: meta-learn an objective, Hydra-style overrides.

Examples:

  python -m metarl.train env=breakout
  python -m metarl.train env=asterix meta.inner_steps=64 agent.num_envs=128

Writes to the Hydra run directory: `config.yaml` (resolved), `metrics.jsonl`,
a W&B run under `wandb/` (offline unless `logger.mode=online`) and the learned
objective under `objective/`, which `metarl.load_objective` reads back.
"""

import sys
import time
from pathlib import Path

import hydra
import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from metarl import distributed
from metarl.cli import check_group_choices, config_dir, fail
from metarl.config import ConfigError, TrainConfig, from_dict
from metarl.export import save_objective
from metarl.logger import NullLogger, RunLogger

CONFIG_GROUPS = ("env", "agent", "objective", "meta", "logger", "distributed")


def _format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _summarise(window: list[dict], objective_values: dict[str, float]) -> dict:
    """One record for a batch of meta-steps: means, and returns over episodes."""
    totals = {k: float(np.sum([m[k] for m in window])) for k in window[0]}
    count = totals["episode/count"]
    record = {
        "episode/return": totals["episode/return_sum"] / count
        if count
        else float("nan"),
        "episode/length": totals["episode/length_sum"] / count
        if count
        else float("nan"),
        "episode/count": count,
        "meta/skipped": totals["meta/skipped"],
        "agent/resets": totals["agent/resets"],
    }
    for key in window[0]:
        if key.startswith(("meta/loss", "meta/grad_norm", "loss/")):
            record[key] = totals[key] / len(window)
    record.update({f"objective/{k}": v for k, v in objective_values.items()})
    return record


def _console_line(step, total, env_steps, sps, record) -> str:
    objective = " ".join(
        f"{k.split('/', 1)[1]}={v:.4g}"
        for k, v in record.items()
        if k.startswith("objective/")
    )
    ret = record["episode/return"]
    ret_text = f"{ret:7.2f}" if np.isfinite(ret) else "    n/a"
    return (
        f"meta-step {step:>5}/{total} | env-steps {_format_count(env_steps):>7} | "
        f"{_format_count(sps):>6} steps/s | return {ret_text} | "
        f"meta-loss {record['meta/loss']:+.4f} | meta-grad-norm "
        f"{record['meta/grad_norm']:.3g} | {objective}"
    )


def run(config: TrainConfig, run_dir: Path, resolved: dict) -> Path:
    """Meta-trains as `config` says and writes everything under `run_dir`.

    Args:
      config: the validated configuration.
      run_dir: where the metrics, W&B run and objective go.
      resolved: the configuration as plain values, for the record.

    Returns:
      The folder of the saved objective (written by process 0 only).

    Raises:
      ConfigError: if the population does not split over the devices, or the
        distributed runtime does not start.
    """
    from metarl.trainer import Trainer

    distributed.initialize(config.distributed)
    meta, log_cfg = config.meta, config.logger
    trainer = Trainer(config)
    main_process = distributed.is_main_process()
    logger_class = RunLogger if main_process else NullLogger
    logger = logger_class(
        run_dir,
        resolved,
        mode=log_cfg.mode,
        project=log_cfg.project,
        entity=log_cfg.entity,
        name=log_cfg.name,
    )
    print(
        f"metarl: {config.env.name} | population {meta.population_size} x "
        f"{config.agent.num_envs} envs | K={meta.inner_steps} inner updates of "
        f"{config.agent.unroll_length} steps | meta.grad={meta.grad} | "
        f"{meta.steps} meta-steps | run dir {run_dir}",
        flush=True,
    )
    layout = trainer.layout
    print(
        f"metarl: {layout.agents_per_device} agent(s) on each of "
        f"{layout.num_devices} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)",
        flush=True,
    )
    state = trainer.init(config.seed)
    start = time.perf_counter()
    print("metarl: compiling the meta-step ...", flush=True)
    window, window_start, env_steps = [], time.perf_counter(), 0
    try:
        for step in range(1, meta.steps + 1):
            state, metrics = trainer.meta_step(state)
            window.append(metrics)
            env_steps += trainer.env_steps_per_meta_step
            if step == 1:
                jax.block_until_ready(metrics)
                print(
                    f"metarl: compiled and ran the first meta-step in "
                    f"{time.perf_counter() - start:.1f}s",
                    flush=True,
                )
                window, window_start = [], time.perf_counter()
                continue
            if step % log_cfg.log_every == 0 or step == meta.steps:
                window = jax.device_get(window)
                elapsed = time.perf_counter() - window_start
                sps = len(window) * trainer.env_steps_per_meta_step / max(elapsed, 1e-9)
                objective_values = trainer.objective.describe(
                    jax.device_get(state.meta_params)
                )
                record = _summarise(window, objective_values)
                record["perf/env_steps"] = env_steps
                record["perf/env_steps_per_second"] = sps
                record["perf/wall_seconds"] = time.perf_counter() - start
                logger.log(record, step=step)
                print(
                    _console_line(step, meta.steps, env_steps, sps, record), flush=True
                )
                window, window_start = [], time.perf_counter()
    finally:
        objective_dir = run_dir / "objective"
        if main_process:
            save_objective(
                objective_dir,
                trainer.objective,
                jax.device_get(state.meta_params),
                train_envs=[config.env.name],
                meta_step=int(state.step),
            )
        logger.close()
    print(
        f"metarl: done in {time.perf_counter() - start:.1f}s; objective saved to "
        f"{objective_dir}",
        flush=True,
    )
    return objective_dir


def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        config = from_dict(TrainConfig, resolved)
    except ConfigError as error:
        fail(str(error))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        distributed.initialize(config.distributed)
        if distributed.is_main_process():
            (run_dir / "config.yaml").write_text(
                OmegaConf.to_yaml(OmegaConf.create(resolved))
            )
        with distributed.quiet_unless_main():
            run(config, run_dir, resolved)
    except ConfigError as error:
        fail(str(error))


def main() -> None:
    """Entry point of `python -m metarl.train`."""
    check_group_choices(sys.argv[1:], CONFIG_GROUPS)
    try:
        sys.argv += distributed.start_from_argv(sys.argv[1:])
    except ConfigError as error:
        fail(str(error))
    hydra.main(version_base=None, config_path=str(config_dir()), config_name="config")(
        _main
    )()


if __name__ == "__main__":
    main()
