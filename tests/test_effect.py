"""Meta-training repairs a deliberately poor objective: the effect, not plumbing.

Starting from a parametric objective with a short-sighted discount (0.5) and
an entropy weight that keeps the policy near uniform (0.5), meta-training on
Catch must reach at least 90% of the hand-designed A2C baseline's final
return, both measured by `metarl.evaluate` with the same network, optimiser,
seeds and budget.
"""

import jax
import jax.numpy as jnp
import numpy as np

from metarl import ParametricObjective, save_objective
from metarl.config import (
    AgentConfig,
    EnvConfig,
    LoggerConfig,
    MetaConfig,
    ObjectiveConfig,
    OptimizerConfig,
    TrainConfig,
)
from metarl.evaluate import EvaluateConfig, evaluate, final_returns, train_curves
from metarl.trainer import Trainer

AGENT = AgentConfig(
    num_envs=16,
    unroll_length=16,
    hidden_sizes=(32,),
    optimizer=OptimizerConfig(learning_rate=3e-3),
)
POOR = ObjectiveConfig(init_discount=0.5, init_entropy_coef=0.5)
SEEDS = 4
UPDATES = 300
REPORT_EVERY = 25
META = MetaConfig(
    steps=150,
    inner_steps=8,
    population_size=2,
    lifetime=UPDATES,
    learning_rate=0.05,
)


def _meta_train() -> tuple[Trainer, dict]:
    config = TrainConfig(
        env=EnvConfig(name="catch"),
        agent=AGENT,
        objective=POOR,
        meta=META,
        logger=LoggerConfig(mode="disabled"),
    )
    trainer = Trainer(config)
    state = trainer.init(seed=0)
    for _ in range(META.steps):
        state, _ = trainer.meta_step(state)
    return trainer, jax.device_get(state.meta_params)


def test_meta_training_recovers_from_poor_objective_on_catch(tmp_path):
    trainer, meta_params = _meta_train()
    learned = trainer.objective.describe(meta_params)
    save_objective(
        tmp_path / "objective",
        trainer.objective,
        meta_params,
        train_envs=["catch"],
        meta_step=META.steps,
    )

    # The starting objective, frozen, is far below the baseline.
    poor = ParametricObjective(
        init_discount=POOR.init_discount, init_entropy_coef=POOR.init_entropy_coef
    )
    (group,) = trainer.groups
    sums, counts = train_curves(
        group, group.problem, poor.init(jnp.float32), SEEDS, UPDATES, REPORT_EVERY
    )
    poor_return = float(np.nanmean(final_returns(sums, counts, 0.1)))

    # The meta-trained objective against A2C, as `metarl.evaluate` measures it.
    run_dir = tmp_path / "eval"
    run_dir.mkdir()
    summary = evaluate(
        EvaluateConfig(
            objective_path=str(tmp_path / "objective"),
            env=EnvConfig(name="catch"),
            agent=AGENT,
            seeds=SEEDS,
            updates=UPDATES,
            report_every=REPORT_EVERY,
            logger_mode="disabled",
        ),
        run_dir,
    )
    baseline = summary["a2c"]["final_return_mean"]
    recovered = summary["learned"]["final_return_mean"]
    print(
        f"poor {poor_return:.3f} learned {recovered:.3f} a2c {baseline:.3f} "
        f"objective {learned}"
    )

    # Catch returns lie in [-1, 1]; the ratio is meaningful above zero.
    assert baseline > 0.5
    assert poor_return < 0.9 * baseline
    assert recovered >= 0.9 * baseline
