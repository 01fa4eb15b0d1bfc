"""The actor-critic loss with lambda-returns, its hyperparameters as arrays."""

from typing import NamedTuple

import chex
import distrax
import jax
import jax.numpy as jnp
import rlax

from agents.rollout import Trajectory


class LossHyperparams(NamedTuple):
    """Scalars of the actor-critic loss; arrays, so they can be meta-learned."""

    discount: chex.Array
    lambda_: chex.Array
    entropy_coef: chex.Array
    value_coef: chex.Array
    policy_coef: chex.Array


def lambda_returns(
    trajectory: Trajectory, discount: chex.Array, lambda_: chex.Array
) -> chex.Array:
    """Lambda-returns of one trajectory `[T]`, differentiable in both scalars.

    The per-step discount is `discount * (1 - terminated)`: zero only where
    an episode terminated. At a truncation the trace is cut (`lambda_t = 0`)
    so the return bootstraps from the value of the final observation and
    never mixes in the next episode.

    Args:
      trajectory: a single-environment trajectory with `[T]` leaves.
      discount: the discount factor, a scalar.
      lambda_: the trace parameter, a scalar.

    Returns:
      The returns `G_t`, shape `[T]`.
    """
    discount_t = discount * (1.0 - trajectory.terminated.astype(discount.dtype))
    lambda_t = lambda_ * (1.0 - trajectory.truncated.astype(discount.dtype))
    # Targets are constants for the agent's parameters (the values come from
    # the rollout) but must stay differentiable in discount and lambda, so
    # rlax's target stop-gradient is off.
    return rlax.lambda_returns(
        trajectory.rewards.astype(discount.dtype),
        discount_t,
        trajectory.next_values.astype(discount.dtype),
        lambda_t,
        stop_target_gradients=False,
    )


def actor_critic_loss(
    network, params, trajectory: Trajectory, hyper: LossHyperparams
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """The advantage actor-critic loss on a `[T, B]` trajectory.

    `policy_coef * policy_gradient + value_coef * 0.5 * (G - v)^2
    - entropy_coef * entropy`, averaged over steps and environments, with
    `G` the lambda-returns. The advantage's baseline is the rollout's own
    value of each state, part of the data, so the loss holds no
    stop-gradient: its gradient is the exact gradient of a scalar function of
    the parameters, whose Hessian is symmetric, as MixFlow-MG assumes, and
    finite differences of the unroll agree with its derivatives.

    Args:
      network: a `Network` with `apply(params, obs) -> (logits, value)`.
      params: the agent's parameters.
      trajectory: time-major `[T, B]` trajectory.
      hyper: the loss's scalars.

    Returns:
      `(loss, metrics)` with flat metric names.
    """
    logits, values = network.apply(params, trajectory.obs)  # [T, B, A], [T, B]
    returns = jax.vmap(lambda_returns, in_axes=(1, None, None), out_axes=1)(
        trajectory, hyper.discount, hyper.lambda_
    )  # [T, B]

    # Policy gradient; the baseline comes from the rollout, a constant.
    policy = distrax.Categorical(logits=logits)
    log_prob = policy.log_prob(trajectory.actions)
    advantages = returns - trajectory.values.astype(returns.dtype)
    policy_loss = -jnp.mean(log_prob * advantages)

    # Regression of the values on the returns.
    value_loss = 0.5 * jnp.mean(jnp.square(returns - values))

    # Entropy bonus for exploration.
    entropy = jnp.mean(policy.entropy())

    loss = (
        hyper.policy_coef * policy_loss
        + hyper.value_coef * value_loss
        - hyper.entropy_coef * entropy
    )
    metrics = {
        "loss/total": loss,
        "loss/policy": policy_loss,
        "loss/value": value_loss,
        "loss/entropy": entropy,
    }
    return loss, metrics
