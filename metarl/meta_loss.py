"""The meta-loss: how well the updated agents' policies do on fresh data."""

import chex
import distrax
import jax
import jax.numpy as jnp

from agents import Trajectory
from agents.loss import lambda_returns


def policy_gradient_meta_loss(
    network, params, trajectory: Trajectory, discount: float, lambda_: float
) -> chex.Array:
    """An actor-critic policy-gradient surrogate with a fixed discount.

    `-mean(log pi(a_t | s_t) * A_t)` with `A_t = G_t - v(s_t)` from the
    trajectory's own values and fixed `discount` and `lambda_`, so the
    meta-loss does not move with the objective it trains. Its gradient with
    respect to `params` is the policy gradient of the updated agent.

    Args:
      network: a `Network` with `apply(params, obs) -> (logits, value)`.
      params: the updated agent's parameters.
      trajectory: a fresh `[T, B]` rollout of those parameters.
      discount: the meta-loss's discount.
      lambda_: the meta-loss's trace parameter.

    Returns:
      The scalar meta-loss.
    """
    logits, _ = network.apply(params, trajectory.obs)  # [T, B, A]
    dtype = logits.dtype
    returns = jax.vmap(lambda_returns, in_axes=(1, None, None), out_axes=1)(
        trajectory, jnp.asarray(discount, dtype), jnp.asarray(lambda_, dtype)
    )  # [T, B]
    advantages = jax.lax.stop_gradient(returns - trajectory.values.astype(dtype))
    log_prob = distrax.Categorical(logits=logits).log_prob(trajectory.actions)
    return -jnp.mean(log_prob * advantages)
