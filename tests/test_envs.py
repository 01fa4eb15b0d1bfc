"""Environment batches: bootstrapping at truncation, discounts, episode tallies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from agents import Trajectory
from agents.loss import lambda_returns


def _run_steps(env, num_steps, action=0, seed=0):
    carry = env.reset(jax.random.key(seed))
    outputs, carries = [], []
    for i in range(num_steps):
        obs_before = carry.obs
        carry, out = env.step(
            carry, jnp.full((env.num_envs,), action), jax.random.key(seed + i + 1)
        )
        outputs.append(out)
        carries.append((obs_before, carry))
    return outputs, carries


def test_unknown_env_lists_valid_names():
    with pytest.raises(envs.UnknownEnvError, match="breakout") as info:
        envs.make("nosuchgame", 4)
    assert "\n" not in str(info.value)
    for name in envs.ENV_IDS:
        assert name in str(info.value)


def test_every_short_name_builds_and_steps():
    # NOTE: gymnax's Freeway mixes int32 and int64 under 64-bit mode and fails
    # there, so environments are smoke-tested in the default 32-bit mode.
    with jax.enable_x64(False):
        for name in envs.ENV_IDS:
            env = envs.make(name, 3)
            (out,), _ = _run_steps(env, 1)
            assert out.next_obs.shape == (3, *env.obs_shape)
            assert out.reward.shape == (3,)


def test_truncation_returns_final_observation_not_reset():
    # CartPole with the pole pushed one way ends after ~10 steps by termination;
    # a time limit of 3 truncates first.
    env = envs.make("cartpole", 4, max_episode_steps=3)
    outputs, carries = _run_steps(env, 3, action=1)
    last = outputs[-1]
    assert bool(jnp.all(last.truncated))
    assert not bool(jnp.any(last.terminated))
    obs_before, carry_after = carries[-1]
    # The carry restarted; the bootstrap observation is where the episode stopped.
    assert not np.allclose(last.next_obs, carry_after.obs)
    assert np.all(carry_after.episode_length == 0)
    # CartPole's state moves by velocity * 0.02 per step: the final observation
    # stays close to the observation before the last step, the reset one does not
    # have to.
    np.testing.assert_allclose(last.next_obs[:, 0], obs_before[:, 0], atol=0.05)


def test_episode_tallies_count_only_finished_episodes():
    env = envs.make("cartpole", 2, max_episode_steps=5)
    outputs, _ = _run_steps(env, 7, action=1)
    finished = [o for o in outputs if bool(jnp.any(o.truncated | o.terminated))]
    running = [o for o in outputs if not bool(jnp.any(o.truncated | o.terminated))]
    # CartPole gives reward 1 a step: a finished episode's return is its length.
    for out in finished:
        done = np.asarray(out.truncated | out.terminated)
        np.testing.assert_array_equal(out.finished_length[done], 5)
        np.testing.assert_array_equal(out.finished_return[done], 5.0)
    for out in running:
        assert float(out.finished_return.sum()) == 0.0
        assert int(out.finished_length.sum()) == 0


def _trajectory(rewards, terminated, truncated, next_values):
    t = len(rewards)
    return Trajectory(
        obs=jnp.zeros((t, 1)),
        actions=jnp.zeros((t,), jnp.int32),
        rewards=jnp.asarray(rewards, jnp.float64),
        terminated=jnp.asarray(terminated),
        truncated=jnp.asarray(truncated),
        values=jnp.zeros((t,)),
        next_values=jnp.asarray(next_values, jnp.float64),
    )


def test_discount_is_zero_only_on_termination():
    gamma, lam = jnp.float64(0.9), jnp.float64(1.0)
    traj = _trajectory(
        rewards=[1.0, 1.0, 1.0],
        terminated=[False, True, False],
        truncated=[False, False, False],
        next_values=[5.0, 7.0, 3.0],
    )
    returns = lambda_returns(traj, gamma, lam)
    # Step 1 terminated: no bootstrap. Step 0 bootstraps through step 1.
    np.testing.assert_allclose(returns, [1.0 + 0.9 * 1.0, 1.0, 1.0 + 0.9 * 3.0])


def test_truncation_bootstraps_from_final_observation_value():
    gamma, lam = jnp.float64(0.9), jnp.float64(0.5)
    traj = _trajectory(
        rewards=[1.0, 2.0, 0.5],
        terminated=[False, False, False],
        truncated=[False, True, False],
        next_values=[4.0, 10.0, 6.0],
    )
    returns = np.asarray(lambda_returns(traj, gamma, lam))
    # At the truncation the return is r + gamma * V(final observation) alone,
    # nothing of the next episode leaks in.
    np.testing.assert_allclose(returns[1], 2.0 + 0.9 * 10.0)
    np.testing.assert_allclose(returns[2], 0.5 + 0.9 * 6.0)
    expected_0 = 1.0 + 0.9 * ((1 - 0.5) * 4.0 + 0.5 * returns[1])
    np.testing.assert_allclose(returns[0], expected_0)
