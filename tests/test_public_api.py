"""An agent written only against metarl's public API learns CartPole.

The network, the environment loop and the optimiser are the user's own
(flax, gymnax, optax); metarl contributes only the saved and reloaded
objective and `make_trajectory`.
"""

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metarl

NUM_ENVS = 16
UNROLL = 32
UPDATES = 250
# A uniformly random policy averages about 22 on CartPole-v1 and almost never
# exceeds 60 on average over many episodes.
RANDOM_POLICY_RETURN = 22.0
LEARNED_THRESHOLD = 3 * RANDOM_POLICY_RETURN


class UserActorCritic(nn.Module):
    """The user's own network: a small tanh MLP with two heads."""

    num_actions: int

    @nn.compact
    def __call__(self, obs):
        hidden = nn.tanh(nn.Dense(64)(obs))
        hidden = nn.tanh(nn.Dense(64)(hidden))
        logits = nn.Dense(self.num_actions)(hidden)
        value = nn.Dense(1)(hidden)
        return logits, value[..., 0]


def _train_cartpole(loaded, seed):
    """Trains a fresh agent with the loaded objective; returns episode returns."""
    env, env_params = gymnax.make("CartPole-v1")
    network = UserActorCritic(env.action_space(env_params).n)
    optimizer = optax.adam(3e-3)

    key = jax.random.key(seed)
    key, init_key, reset_key = jax.random.split(key, 3)
    params = network.init(init_key, jnp.zeros(env.observation_space(env_params).shape))
    opt_state = optimizer.init(params)
    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
        jax.random.split(reset_key, NUM_ENVS), env_params
    )
    running = jnp.zeros(NUM_ENVS)

    def env_step(carry, key):
        params, obs, env_state, running = carry
        act_key, step_key = jax.random.split(key)
        logits, value = network.apply(params, obs)
        action = jax.random.categorical(act_key, logits)
        next_obs, env_state, reward, terminated, truncated, info = jax.vmap(
            env.step, in_axes=(0, 0, 0, None)
        )(jax.random.split(step_key, NUM_ENVS), env_state, action, env_params)
        _, next_value = network.apply(params, info["final_observation"])
        done = terminated | truncated
        running = running + reward
        finished = jnp.where(done, running, jnp.nan)
        step = (obs, action, reward, terminated, truncated, value, next_value)
        carry = (params, next_obs, env_state, jnp.where(done, 0.0, running))
        return carry, (step, finished)

    @jax.jit
    def update(params, opt_state, obs, env_state, running, key):
        carry = (params, obs, env_state, running)
        carry, (steps, finished) = jax.lax.scan(
            env_step, carry, jax.random.split(key, UNROLL)
        )
        trajectory = metarl.make_trajectory(*steps)
        grads, metrics = jax.grad(loaded.loss, argnums=1, has_aux=True)(
            network, params, trajectory
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        _, obs, env_state, running = carry
        return params, opt_state, obs, env_state, running, finished, metrics

    returns = []
    for _ in range(UPDATES):
        key, update_key = jax.random.split(key)
        params, opt_state, obs, env_state, running, finished, metrics = update(
            params, opt_state, obs, env_state, running, update_key
        )
        finished = np.asarray(finished).ravel()
        returns.append(finished[np.isfinite(finished)])
        assert np.isfinite(float(metrics["loss/total"]))
    return returns


def test_user_agent_learns_cartpole_with_loaded_objective(tmp_path):
    objective = metarl.ParametricObjective()
    metarl.save_objective(
        tmp_path / "objective",
        objective,
        objective.init(),
        train_envs=["cartpole"],
        meta_step=0,
    )
    loaded = metarl.load_objective(tmp_path / "objective")

    returns = _train_cartpole(loaded, seed=0)

    late = np.concatenate(returns[-UPDATES // 5 :])
    assert len(late) > 10
    assert np.mean(late) > LEARNED_THRESHOLD


def test_make_trajectory_rejects_mismatched_shapes():
    t, b = 4, 3
    zeros = jnp.zeros((t, b))
    with pytest.raises(ValueError, match="rewards has shape"):
        metarl.make_trajectory(
            jnp.zeros((t, b, 2)), zeros, jnp.zeros((t,)), zeros, zeros, zeros, zeros
        )
