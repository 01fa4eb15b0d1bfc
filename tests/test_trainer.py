"""Meta-gradients of the real trainer: MixFlow-MG against autodiff and finite
differences, in float64 on a tiny Catch configuration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from metarl.meta_loss import policy_gradient_meta_loss
from metarl.metagrad import InnerProblem, InnerState, MetaGradConfig, unroll
from metarl.trainer import AgentMeta, Trainer


def _max_relative_error(a, b):
    errors = jax.tree.map(
        lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-300)),
        a,
        b,
    )
    return max(jax.tree.leaves(errors))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("inner_steps", [1, 3, 8])
def test_mixflow_matches_autodiff_on_catch(optimizer, inner_steps):
    grads = {}
    for mode in ("mixflow", "autodiff"):
        trainer = Trainer(
            tiny_config(optimizer=optimizer, inner_steps=inner_steps, grad=mode)
        )
        state = trainer.init(seed=1)
        _, grads[mode] = jax.jit(trainer.meta_gradient)(state)
    assert _max_relative_error(grads["mixflow"], grads["autodiff"]) < 1e-10


@pytest.mark.parametrize(
    "residuals",
    [
        {"store_rollout": False},
        {"store_rollout": False, "replay_rollout": False, "store_inner_grad": False},
    ],
    ids=["replayed", "recomputed"],
)
def test_mixflow_rebuilding_the_rollout_matches_autodiff_on_catch(residuals):
    # Four-step rollouts over three updates pass through Catch's episode ends.
    grads = {}
    for mode, options in (("mixflow", residuals), ("autodiff", {})):
        trainer = Trainer(tiny_config(inner_steps=3, grad=mode, **options))
        state = trainer.init(seed=3)
        _, grads[mode] = jax.jit(trainer.meta_gradient)(state)
    assert _max_relative_error(grads["mixflow"], grads["autodiff"]) < 1e-10


def test_every_meta_parameter_gets_finite_nonzero_meta_gradient():
    # CartPole rewards every step, so the returns depend on discount and lambda
    # even in a four-step rollout.
    trainer = Trainer(tiny_config(env="cartpole", inner_steps=3))
    state = trainer.init(seed=0)
    _, grads = jax.jit(trainer.meta_gradient)(state)
    assert set(grads) == {
        "discount_logit",
        "lambda_logit",
        "log_entropy_coef",
        "log_value_coef",
    }
    for name, grad in grads.items():
        assert bool(jnp.isfinite(grad)), name
        assert float(jnp.abs(grad)) > 0.0, name


def test_meta_gradient_matches_finite_differences_with_fixed_trajectories():
    """Trajectories are constants for differentiation: replaying the recorded
    ones gives the trainer's meta-gradient exactly, and central differences of
    the replayed meta-loss agree with it."""
    num_steps = 3
    trainer = Trainer(tiny_config(inner_steps=num_steps))
    state = trainer.init(seed=2)
    meta_params = state.meta_params
    (group,) = trainer.groups
    first = jax.tree.map(lambda x: x[0], state.population[0].inner)

    def agent_meta(meta_params):
        return AgentMeta(meta_params, jnp.asarray(group.learning_rates[0]))

    # Record what the unroll and the meta-loss see at these meta-parameters.
    recorded = []

    def recording_rollout(params, env, key):
        data, env, stats = group.problem.rollout(params, env, key)
        recorded.append(data)
        return data, env, stats

    recorder = InnerProblem(recording_rollout, group.problem.loss, group.problem.update)
    inner = first
    with jax.disable_jit():
        for _ in range(num_steps):
            inner, _ = unroll(
                recorder, agent_meta(meta_params), inner, 1, MetaGradConfig("autodiff")
            )
    _, rollout_key = jax.random.split(inner.key)
    meta_data, _, _ = group.problem.rollout(inner.params, inner.env, rollout_key)
    trajectories = jax.tree.map(lambda *xs: jnp.stack(xs), *recorded)

    # A problem that replays them, indexed by a step counter in place of envs.
    def replay(params, step, key):
        del params, key
        data = jax.tree.map(lambda x: x[step], trajectories)
        return data, step + 1, ()

    replayer = InnerProblem(replay, group.problem.loss, group.problem.update)
    start = InnerState(first.params, first.opt_state, jnp.int32(0), first.key)

    def replayed_meta_loss(meta_params, mode="mixflow"):
        final, _ = unroll(
            replayer, agent_meta(meta_params), start, num_steps, MetaGradConfig(mode)
        )
        return policy_gradient_meta_loss(
            group.network,
            final.params,
            meta_data,
            trainer.config.meta.discount,
            trainer.config.meta.lambda_,
        )

    replay_grads = jax.grad(replayed_meta_loss)(meta_params)

    # The replayed meta-gradient is the trainer's own for this agent.
    def agent_meta_loss(meta_params):
        return trainer.agent_meta_loss(group, agent_meta(meta_params), first)[0]

    agent_grads = jax.grad(agent_meta_loss)(meta_params)
    assert _max_relative_error(replay_grads, agent_grads) < 1e-10

    # Central differences along each meta-parameter.
    eps = 1e-6
    for name in meta_params:
        plus = dict(meta_params, **{name: meta_params[name] + eps})
        minus = dict(meta_params, **{name: meta_params[name] - eps})
        numeric = (replayed_meta_loss(plus) - replayed_meta_loss(minus)) / (2 * eps)
        np.testing.assert_allclose(
            float(numeric), float(replay_grads[name]), rtol=1e-5, atol=1e-12
        )


def test_meta_step_updates_objective_and_counts_resets():
    config = tiny_config(inner_steps=2, lifetime=4)
    trainer = Trainer(config)
    state = trainer.init(seed=0)
    before = jax.device_get(state.meta_params)
    ages = np.asarray(state.population[0].age)
    # Two agents staggered over a lifetime of 4 updates: ages 0 and 2.
    np.testing.assert_array_equal(ages, [0, 2])
    state, metrics = trainer.meta_step(state)
    after = jax.device_get(state.meta_params)
    assert any(not np.allclose(before[k], after[k]) for k in before)
    # The second agent reached its lifetime (2 + 2 updates) and restarted.
    assert int(metrics["agent/resets"]) == 1
    np.testing.assert_array_equal(np.asarray(state.population[0].age), [2, 0])
    assert int(state.step) == 1
    steps_per_meta_step = 2 * 2 * 4 * (2 + 1)
    assert trainer.env_steps_per_meta_step == steps_per_meta_step
