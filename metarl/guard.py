"""Guards against non-finite numbers: skip the update, count it, stop a lost run.

A NaN or an infinity in one agent's gradient would otherwise spread to its
parameters, then to the meta-gradient and to the objective, and the run would
go on producing numbers that mean nothing. Inside the compiled step a
non-finite agent update is replaced by no update at all; on the host, a run
whose meta-updates keep being skipped is stopped.
"""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax


class SkipNonFiniteState(NamedTuple):
    """The wrapped optimiser's state and a count of the updates it refused."""

    inner_state: Any
    skipped: chex.Array  # [] int32, non-finite updates skipped since init


def all_finite(tree) -> chex.Array:
    """Whether every element of every leaf of `tree` is finite.

    Args:
      tree: a pytree of floating-point arrays.

    Returns:
      A `[]` bool array (True for a tree without leaves).
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def skip_nonfinite(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """Wraps `inner` so that a non-finite step changes nothing.

    If the gradients or the updates `inner` computes from them hold a NaN or
    an infinity, the update is zero and `inner`'s state stays as it was, so
    the parameters and the optimiser state come out exactly unchanged; the
    step is counted in `SkipNonFiniteState.skipped`. Unlike
    `optax.apply_if_finite`, a long run of bad steps is never let through.

    The test is a `where` on values, not a branch: for finite inputs the
    wrapped update has the same first and second derivatives as `inner`, so
    meta-gradients (forward- or reverse-mode) through it are unchanged.

    Args:
      inner: the optimiser to protect.

    Returns:
      An `optax.GradientTransformation` with `SkipNonFiniteState` as state.
    """

    def init_fn(params):
        return SkipNonFiniteState(
            inner_state=inner.init(params), skipped=jnp.zeros((), jnp.int32)
        )

    def update_fn(grads, state, params=None):
        updates, inner_state = inner.update(grads, state.inner_state, params)
        finite = all_finite(grads) & all_finite(updates)
        updates = jax.tree.map(
            lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates
        )
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), inner_state, state.inner_state
        )
        skipped = state.skipped + jnp.logical_not(finite).astype(jnp.int32)
        return updates, SkipNonFiniteState(inner_state=inner_state, skipped=skipped)

    return optax.GradientTransformation(init_fn, update_fn)


def skipped_updates(opt_state: SkipNonFiniteState) -> chex.Array:
    """The number of updates `skip_nonfinite` refused since its state was made.

    Args:
      opt_state: the state of a `skip_nonfinite` optimiser, batched or not.

    Returns:
      The counts, `[]` or with the batch's leading axes (`[P]` for a
      population).
    """
    return opt_state.skipped


class RunStopped(RuntimeError):
    """The run stopped before its last meta-step; the message says why and what next.

    Attributes:
      exit_code: the status the command-line entry point exits with.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class SkipStreak:
    """Counts meta-updates skipped in a row and says when there were too many.

    Args:
      limit: how many skipped meta-updates in a row stop the run.
      count: the streak to start from (a resumed run carries it over).
    """

    def __init__(self, limit: int, count: int = 0):
        self.limit = limit
        self.count = count

    def update(self, skipped: bool) -> None:
        """Records one meta-step: `skipped` if its meta-update was skipped."""
        self.count = self.count + 1 if skipped else 0

    @property
    def tripped(self) -> bool:
        """Whether the streak reached the limit."""
        return self.count >= self.limit
