"""`python -m metarl.evaluate`: train fresh agents with a frozen objective.

Examples:

  python -m metarl.evaluate objective=outputs/DATE/TIME/objective env=breakout
  python -m metarl.evaluate objective=PATH env=asterix seeds=3 updates=4000

For each seed, one agent learns with the loaded objective and one with the
hand-designed A2C baseline (the parametric actor-critic loss at its standard
discount 0.99, lambda 0.95, entropy weight 0.01 and value weight 0.5), with
the same network, optimiser and budget. Prints the mean and standard error
over seeds of the final return, and writes `curves.csv`, `curves.png` and
`summary.json` to the Hydra run directory.
"""

import csv
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from metarl.cli import (
    check_group_choices,
    compose_config,
    config_dir,
    expand_env_list,
    fail,
    quiet_backend_probing,
)
from metarl.config import (
    AgentConfig,
    ConfigError,
    EnvConfig,
    MetaConfig,
    ObjectiveConfig,
    TrainConfig,
    from_dict,
)
from metarl.export import ObjectiveFileError, load_objective
from metarl.logger import RunLogger
from metarl.metagrad import MetaGradConfig, unroll
from metarl.objectives import ParametricObjective
from metarl.trainer import AgentMeta, Trainer, inner_problem


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Settings of `python -m metarl.evaluate`."""

    objective_path: str = ""
    env: EnvConfig = EnvConfig()
    agent: AgentConfig = AgentConfig()
    seeds: int = 5
    updates: int = 2000
    report_every: int = 50
    final_fraction: float = 0.1
    logger_mode: str = "offline"
    project: str = "metarl"
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("seeds", "updates", "report_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.final_fraction <= 1.0:
            raise ConfigError(
                f"final_fraction must lie in (0, 1], got {self.final_fraction}"
            )
        if len(self.env.names) != 1:
            raise ConfigError(
                f"evaluate trains on one environment, got env.name="
                f"{list(self.env.names)}; run it once per environment"
            )
        if len(self.agent.optimizer.learning_rates) != 1:
            raise ConfigError(
                "evaluate trains with one learning rate, got "
                f"agent.optimizer.learning_rate={list(self.agent.optimizer.learning_rates)}"
            )
        if not self.objective_path:
            raise ConfigError(
                "objective=PATH is required: the objective folder a training run "
                "wrote (RUN_DIR/objective)"
            )


def train_curves(
    group, problem, meta_params, seeds: int, updates: int, report_every: int
):
    """Trains `seeds` fresh agents with a frozen objective; returns their curves.

    Args:
      group: the trainer's `AgentGroup`, whose agents' initialisation and
        learning rate are used; its meta-gradient machinery is not.
      problem: the inner learner, with the objective to train with.
      meta_params: the objective's frozen parameters.
      seeds: how many independent agents.
      updates: inner updates per agent.
      report_every: updates per point of the curve.

    Returns:
      `(return_sums, episode_counts)`, arrays `[updates // report_every,
      seeds]`: returns of the episodes that finished in each span.
    """
    keys = jax.random.split(jax.random.key(12345), seeds)
    agents = jax.vmap(group.init_agent)(keys)
    no_meta_gradient = MetaGradConfig(mode="autodiff")
    meta = AgentMeta(
        objective=meta_params,
        learning_rate=jnp.asarray(group.learning_rates[0], group.dtype),
    )

    @jax.jit
    def run_span(agents):
        def one(agent):
            agent, (_, stats) = unroll(
                problem, meta, agent, report_every, no_meta_gradient
            )
            return agent, stats.return_sum.sum(), stats.episodes.sum()

        return jax.vmap(one)(agents)

    sums, counts = [], []
    for _ in range(updates // report_every):
        agents, span_sum, span_count = run_span(agents)
        sums.append(span_sum)
        counts.append(span_count)
    return np.asarray(jax.device_get(sums)), np.asarray(jax.device_get(counts))


def final_returns(return_sums, counts, final_fraction: float) -> np.ndarray:
    """Per-seed mean return of the episodes finished in the last spans."""
    spans = max(1, int(round(len(return_sums) * final_fraction)))
    total = return_sums[-spans:].sum(0)
    episodes = counts[-spans:].sum(0)
    return np.where(episodes > 0, total / np.maximum(episodes, 1), np.nan)


def _mean_stderr(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    stderr = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(stderr)


def _write_outputs(run_dir: Path, steps_per_span: int, curves: dict) -> None:
    with open(run_dir / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["objective", "seed", "env_steps", "return"])
        for name, (sums, counts) in curves.items():
            for span in range(sums.shape[0]):
                for seed in range(sums.shape[1]):
                    value = (
                        sums[span, seed] / counts[span, seed]
                        if counts[span, seed]
                        else ""
                    )
                    writer.writerow([name, seed, (span + 1) * steps_per_span, value])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (sums, counts) in curves.items():
        per_seed = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        # A point where no seed finished an episode stays a gap in the curve;
        # numpy would warn about each such empty mean.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(per_seed, axis=1)
            stderr = np.nanstd(per_seed, axis=1) / np.sqrt(per_seed.shape[1])
        x = np.arange(1, len(mean) + 1) * steps_per_span
        ax.plot(x, mean, label=name)
        ax.fill_between(x, mean - stderr, mean + stderr, alpha=0.25)
    ax.set_xlabel("environment steps per agent")
    ax.set_ylabel("episode return")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=120)
    plt.close(fig)


def evaluate(config: EvaluateConfig, run_dir: Path) -> dict:
    """Trains agents with the loaded objective and the baseline; writes results.

    Returns:
      The summary: mean and standard error of the final return per objective.

    Raises:
      ObjectiveFileError: if the objective folder cannot be read.
    """
    loaded = load_objective(config.objective_path)
    # The network is built for the loaded objective (learned targets need a
    # prediction head, which the baseline's loss leaves unused).
    spec = {
        k: v
        for k, v in loaded.objective.spec().items()
        if k in {f.name for f in dataclasses.fields(ObjectiveConfig)}
    }
    train_config = TrainConfig(
        env=config.env,
        agent=config.agent,
        objective=ObjectiveConfig(name=loaded.objective.name, **spec),
        meta=MetaConfig(population_size=1),
        dtype=config.dtype,
    )
    trainer = Trainer(train_config, devices=jax.devices()[:1])
    (group,) = trainer.groups
    dtype = trainer.dtype
    baseline = ParametricObjective()
    learned_problem = inner_problem(
        loaded.objective,
        group.network,
        group.env,
        group.optimizer,
        config.agent.unroll_length,
    )
    baseline_problem = inner_problem(
        baseline, group.network, group.env, group.optimizer, config.agent.unroll_length
    )
    objectives = {
        "learned": (
            learned_problem,
            jax.tree.map(lambda x: jnp.asarray(x, dtype), loaded.meta_params),
        ),
        "a2c": (baseline_problem, baseline.init(dtype)),
    }
    steps_per_update = config.agent.num_envs * config.agent.unroll_length
    logger = RunLogger(
        run_dir,
        dataclasses.asdict(config),
        mode=config.logger_mode,
        project=config.project,
    )
    print(
        f"metarl: evaluating {config.objective_path} ({loaded.objective.name}) on "
        f"{config.env.names[0]}: "
        f"{config.seeds} seeds x {config.updates} updates "
        f"({config.updates * steps_per_update} env steps each), learned objective "
        "and A2C baseline",
        flush=True,
    )
    curves, summary = {}, {}
    for name, (problem, meta_params) in objectives.items():
        start = time.perf_counter()
        sums, counts = train_curves(
            group,
            problem,
            meta_params,
            config.seeds,
            config.updates,
            config.report_every,
        )
        curves[name] = (sums, counts)
        mean, stderr = _mean_stderr(final_returns(sums, counts, config.final_fraction))
        summary[name] = {"final_return_mean": mean, "final_return_stderr": stderr}
        print(
            f"metarl: {name:>7}: final return {mean:.2f} +- {stderr:.2f} "
            f"({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
        logger.log({f"eval/{name}/final_return": mean}, step=0)
    _write_outputs(run_dir, config.report_every * steps_per_update, curves)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    return summary


def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        config = from_dict(EvaluateConfig, resolved)
    except ConfigError as error:
        fail(str(error))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        evaluate(config, run_dir)
    except ObjectiveFileError as error:
        fail(str(error))


def main() -> None:
    """Entry point of `python -m metarl.evaluate`."""
    quiet_backend_probing()
    # `objective` names a config group of training, which Hydra would try to
    # select; the path is stored under its own key instead.
    sys.argv[1:] = [
        "objective_path=" + arg.partition("=")[2]
        if arg.startswith("objective=")
        else arg
        for arg in sys.argv[1:]
    ]
    argv = expand_env_list(sys.argv[1:])
    check_group_choices(argv, ("env", "agent"))
    # Bad settings or a missing objective end here, before Hydra creates a
    # run directory.
    try:
        config = from_dict(EvaluateConfig, compose_config(argv, "evaluate"))
        load_objective(config.objective_path)
    except (ConfigError, ObjectiveFileError) as error:
        fail(str(error))
    sys.argv[1:] = argv
    hydra.main(
        version_base=None, config_path=str(config_dir()), config_name="evaluate"
    )(_main)()


if __name__ == "__main__":
    main()
