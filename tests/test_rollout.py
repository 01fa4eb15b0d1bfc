"""Rollouts: values of the next states, and replaying a rollout from its record."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from agents import make_network, record, replay, rollout


def _rollout(env_name, prediction_size=0, max_episode_steps=None, steps=12, seed=0):
    env = envs.make(env_name, 3, max_episode_steps)
    network = make_network(
        env.num_actions, env.obs_shape, (8,), prediction_size=prediction_size
    )
    params_key, env_key, key = jax.random.split(jax.random.key(seed), 3)
    params = network.init(params_key, jnp.float64)
    carry = env.reset(env_key)
    trajectory, _, _ = rollout(network, params, env, carry, key, steps)
    return env, network, params, carry, key, trajectory


@pytest.mark.parametrize(
    ("env_name", "prediction_size", "max_episode_steps"),
    [("catch", 0, None), ("cartpole", 4, 5), ("breakout", 0, None)],
)
def test_replay_rebuilds_the_rollout_exactly(
    env_name, prediction_size, max_episode_steps
):
    env, _, _, carry, key, trajectory = _rollout(
        env_name, prediction_size, max_episode_steps
    )
    replayed = replay(env, carry, key, record(trajectory))
    for name, expected in trajectory._asdict().items():
        actual = getattr(replayed, name)
        if expected is None:
            assert actual is None, name
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=name)


def test_replay_covers_episodes_that_end_inside_the_rollout():
    # Catch ends every 9 steps and CartPole is cut at 5 here, so the replays
    # above pass through automatic resets, where the observations jump.
    *_, catch = _rollout("catch")
    *_, cartpole = _rollout("cartpole", 4, max_episode_steps=5)
    assert bool(jnp.any(catch.terminated))
    assert bool(jnp.any(cartpole.truncated))


def test_next_values_are_the_values_of_the_states_reached():
    # Truncated CartPole episodes: where an episode goes on, the next value is
    # the next step's value; where it was cut, it is the value of the final
    # observation, not of the reset state that the next step starts from.
    *_, trajectory = _rollout("cartpole", 4, max_episode_steps=5)
    done = np.asarray(trajectory.terminated | trajectory.truncated)
    next_values = np.asarray(trajectory.next_values)
    values = np.asarray(trajectory.values)
    going_on = ~done[:-1]
    np.testing.assert_allclose(
        next_values[:-1][going_on], values[1:][going_on], rtol=1e-12
    )
    assert not np.allclose(next_values[:-1][~going_on], values[1:][~going_on])
    np.testing.assert_allclose(
        trajectory.next_predictions[:-1][going_on],
        trajectory.predictions[1:][going_on],
        rtol=1e-12,
    )
