"""The trajectory a learned objective reads, built from a user's own rollout."""

import jax.numpy as jnp

from agents import Trajectory


def make_trajectory(
    obs,
    actions,
    rewards,
    terminated,
    truncated,
    values,
    next_values,
    log_probs=None,
    predictions=None,
    next_predictions=None,
) -> Trajectory:
    """Packs the outputs of a user's own rollout for `LoadedObjective.loss`.

    All arguments are time-major, `[T, B, ...]`, and come from the policy
    that acted (the behaviour network's values, not recomputed ones), so the
    objective's targets are constants for the agent's gradient.

    Args:
      obs: observations the actions were taken in, `[T, B, *obs_shape]`.
      actions: the discrete actions taken, `[T, B]`.
      rewards: rewards received, `[T, B]`.
      terminated: whether the episode reached a terminal state at that step
        (no bootstrapping), `[T, B]`.
      truncated: whether it hit a time limit (bootstrap from `next_values`),
        `[T, B]`.
      values: the acting network's values of `obs`, `[T, B]`.
      next_values: its values of the observations the actions led to (before
        any automatic reset), `[T, B]`.
      log_probs: for `learned_targets` only: the acting policy's
        log-probabilities of the actions, `[T, B]`.
      predictions: for `learned_targets` only: the acting network's
        prediction vectors of `obs`, `[T, B, M]`.
      next_predictions: for `learned_targets` only: its prediction vectors of
        the observations the actions led to, `[T, B, M]`.

    Returns:
      An `agents.Trajectory` with boolean flags and integer actions.

    Raises:
      ValueError: if the arrays do not share the same `[T, B]` leading axes.
    """
    obs = jnp.asarray(obs)
    if obs.ndim < 2:
        raise ValueError(
            f"obs must be time-major [T, B, ...], got shape {tuple(obs.shape)}"
        )
    leading = tuple(obs.shape[:2])
    named = {
        "actions": actions,
        "rewards": rewards,
        "terminated": terminated,
        "truncated": truncated,
        "values": values,
        "next_values": next_values,
    }
    if log_probs is not None:
        named["log_probs"] = log_probs
    for name, array in named.items():
        shape = tuple(jnp.shape(array))
        if shape != leading:
            raise ValueError(
                f"{name} has shape {shape}, expected [T, B] = {leading} like obs"
            )
    for name, array in (
        ("predictions", predictions),
        ("next_predictions", next_predictions),
    ):
        if array is not None and tuple(jnp.shape(array))[:2] != leading:
            raise ValueError(
                f"{name} has shape {tuple(jnp.shape(array))}, expected "
                f"[T, B, M] with [T, B] = {leading} like obs"
            )
    return Trajectory(
        obs=obs,
        actions=jnp.asarray(actions).astype(jnp.int32),
        rewards=jnp.asarray(rewards),
        terminated=jnp.asarray(terminated).astype(bool),
        truncated=jnp.asarray(truncated).astype(bool),
        values=jnp.asarray(values),
        next_values=jnp.asarray(next_values),
        log_probs=None if log_probs is None else jnp.asarray(log_probs),
        predictions=None if predictions is None else jnp.asarray(predictions),
        next_predictions=None
        if next_predictions is None
        else jnp.asarray(next_predictions),
    )
