"""Differentiable unrolls of inner updates and their meta-gradients.

An inner learner is described by an `InnerProblem`: a rollout that produces
data (a constant for differentiation), a loss of the agent parameters and the
meta-parameters on that data, and an optimiser update. `unroll` applies `K`
inner steps and is differentiable with respect to the meta-parameters and the
initial parameters and optimiser state, by one of three modes:

* `autodiff`: plain reverse-over-reverse differentiation of the unroll.
* `autodiff_remat`: the same with `jax.checkpoint` on each inner step.
* `mixflow`: MixFlow-MG (Kemaev et al., 2025, "Scalable Meta-Learning via
  Mixed-Mode Differentiation"). Each inner step has a custom VJP whose
  residuals are the step's inputs (and, with `replay_rollout`, the rollout's
  small record); its backward pass rebuilds the rollout and the inner
  gradient, pulls the cotangent back through the optimiser, and gets both
  second-derivative products, `H_thth g_bar` and `H_etath g_bar`, from a
  single forward-mode JVP of the joint gradient `grad_(theta, eta) L` along
  `(g_bar, 0)`. This uses the symmetry of the Hessian of the scalar loss.

Independently of the mode, `checkpoint_every=c` stores only every `c`-th
carry and recomputes the segment in between in the backward pass, so stored
state grows like `K / c + c` rather than `K`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax

GRAD_MODES = ("autodiff", "autodiff_remat", "mixflow")


class MetaGradError(ValueError):
    """Raised when a meta-gradient mode cannot handle the inner problem."""


class InnerState(NamedTuple):
    """The carry of an inner learner from one update to the next."""

    params: Any
    opt_state: Any
    env: Any  # environment carry: receives no cotangent
    key: chex.PRNGKey


@dataclasses.dataclass(frozen=True, eq=False)
class InnerProblem:
    """The three functions that make up one inner update.

    Attributes:
      rollout: `(params, env, key) -> (data, env, stats)`. Its outputs are
        treated as constants for differentiation.
      loss: `(params, meta_params, data) -> (loss, metrics)`, a scalar loss.
        For `mixflow` it must be twice differentiable in forward-over-reverse
        mode.
      update: `(grads, opt_state, params, meta_params) -> (updates,
        opt_state)`, an optax-style update that may read meta-parameters (a
        learned learning rate, say).
      record: optional, `data -> record`: the part of a rollout's data from
        which `replay` rebuilds the rest (the actions and the network's
        outputs, say, without the observations).
      replay: optional, `(record, env, key) -> data`: the rollout's data
        again, from its record and the `env` and `key` the rollout was given,
        without running the agent. It must reproduce the data exactly.
    """

    rollout: Callable[..., tuple[Any, Any, Any]]
    loss: Callable[..., tuple[chex.Array, dict[str, chex.Array]]]
    update: Callable[..., tuple[Any, Any]]
    record: Callable[[Any], Any] | None = None
    replay: Callable[..., Any] | None = None

    def __post_init__(self):
        if (self.record is None) != (self.replay is None):
            raise MetaGradError(
                "InnerProblem needs both record and replay, or neither; "
                "give the missing one or drop the other"
            )

    @property
    def can_replay(self) -> bool:
        """Whether the rollout can be rebuilt from a record."""
        return self.replay is not None


def from_optax(
    optimizer: optax.GradientTransformation,
) -> Callable[..., tuple[Any, Any]]:
    """Adapts an optax transformation to the `InnerProblem.update` signature."""

    def update(grads, opt_state, params, meta_params):
        del meta_params
        return optimizer.update(grads, opt_state, params)

    return update


@dataclasses.dataclass(frozen=True)
class MetaGradConfig:
    """How `unroll` is differentiated.

    Attributes:
      mode: one of `GRAD_MODES`.
      checkpoint_every: store every `c`-th carry only and recompute segments
        in the backward pass (0: store every carry).
      store_rollout: `mixflow` keeps each step's rollout as a residual instead
        of recomputing it from the stored environment state and key.
      replay_rollout: when the rollout is not stored, `mixflow` keeps its
        record (`InnerProblem.record`, which the problem must have) and
        replays the environments in the backward pass instead of running the
        agent's rollout again: a few numbers per environment step more, no
        network forward passes in the rollout's place.
      store_inner_grad: `mixflow` keeps each step's inner gradient as a
        residual instead of recomputing it (one parameter-sized array more per
        step, one gradient less in the backward pass).
    """

    mode: str = "mixflow"
    checkpoint_every: int = 0
    store_rollout: bool = False
    replay_rollout: bool = False
    store_inner_grad: bool = False

    def __post_init__(self):
        for name in ("store_rollout", "replay_rollout", "store_inner_grad"):
            if not isinstance(getattr(self, name), bool):
                raise MetaGradError(
                    f"meta.{name} must be true or false, got {getattr(self, name)!r}"
                )
        if not _is_whole_number(self.checkpoint_every):
            raise MetaGradError(
                f"meta.checkpoint_every must be a whole number, got "
                f"{self.checkpoint_every!r}; write it like meta.checkpoint_every=8"
            )
        if self.mode not in GRAD_MODES:
            raise MetaGradError(
                f"meta.grad must be one of {', '.join(GRAD_MODES)}; got '{self.mode}'"
            )
        if self.checkpoint_every < 0:
            raise MetaGradError(
                f"meta.checkpoint_every must be 0 (off) or positive, got "
                f"{self.checkpoint_every}"
            )


def _is_whole_number(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _split_rollout_key(key: chex.PRNGKey) -> tuple[chex.PRNGKey, chex.PRNGKey]:
    """`(next_key, rollout_key)`: a backward pass that rebuilds a step's rollout
    takes the same rollout key from the stored key."""
    next_key, rollout_key = jax.random.split(key)
    return next_key, rollout_key


def _inner_step_with_intermediates(
    problem: InnerProblem, meta_params, state: InnerState
):
    """One inner update, also returning its rollout and inner gradient."""
    key, rollout_key = _split_rollout_key(state.key)
    data, env, stats = problem.rollout(state.params, state.env, rollout_key)
    data = jax.lax.stop_gradient(data)
    grads, metrics = jax.grad(problem.loss, has_aux=True)(
        state.params, meta_params, data
    )
    updates, opt_state = problem.update(
        grads, state.opt_state, state.params, meta_params
    )
    params = optax.apply_updates(state.params, updates)
    out = (InnerState(params, opt_state, env, key), (metrics, stats))
    return out, data, grads


def _inner_step(problem: InnerProblem, meta_params, state: InnerState):
    """One differentiable inner update: rollout, gradient, optimiser."""
    out, _, _ = _inner_step_with_intermediates(problem, meta_params, state)
    return out


def _zero_cotangent(tree):
    """Zero cotangents for `tree`: float0 for integer and key leaves."""

    def zero(x):
        x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, dtype=jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def _float_cotangent(cotangent, primal):
    """`cotangent` with symbolic or float0 zeros for float leaves made dense."""

    def fix(c, p):
        if jnp.issubdtype(jnp.result_type(p), jnp.inexact):
            if getattr(c, "dtype", None) == jax.dtypes.float0:
                return jnp.zeros_like(p)
            return c
        return np.zeros(jnp.shape(p), dtype=jax.dtypes.float0)

    return jax.tree.map(fix, cotangent, primal)


def _primitive_names(jaxpr) -> set[str]:
    """The names of the primitives in `jaxpr` and in all its sub-jaxprs."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitive_names(sub)
    return names


def _forward_mode_error(reason: str) -> MetaGradError:
    return MetaGradError(
        "meta.grad=mixflow needs forward-mode derivatives of the inner loss, and "
        f"they failed ({reason}); use meta.grad=autodiff"
    )


def _check_forward_mode(joint_grad, params, meta_params) -> None:
    """Raises `MetaGradError` if the loss cannot be differentiated in forward mode.

    A custom VJP reached by forward mode may either fail while tracing or
    leave a `custom_lin` that only fails when compiled, far from here; tracing
    a JVP first catches both with a message that names the fix.
    """
    tangents = jax.tree.map(jnp.zeros_like, (params, meta_params))
    try:
        jaxpr = jax.make_jaxpr(lambda p, m: jax.jvp(joint_grad, (p, m), tangents)[1])(
            params, meta_params
        )
    except TypeError as error:
        raise _forward_mode_error(str(error).strip().splitlines()[0]) from error
    if "custom_lin" in _primitive_names(jaxpr.jaxpr):
        raise _forward_mode_error(
            "a jax.custom_vjp function in the loss has no forward-mode rule"
        )


def _hessian_vector_products(joint_grad, params, meta_params, grads):
    """The inner gradient and `v -> (H_thth v, H_etath v)`, forward-over-reverse.

    With `grads=None` the gradient is recomputed by linearising the joint
    gradient, so that its value and the JVP along `(v, 0)` share one pass
    through the loss; otherwise `grads` is used and the products come from
    one JVP of the joint gradient.

    Returns:
      `(grads, hvp)`.

    Raises:
      MetaGradError: if the loss cannot be differentiated in forward mode.
    """
    _check_forward_mode(joint_grad, params, meta_params)
    meta_tangent = jax.tree.map(jnp.zeros_like, meta_params)
    if grads is None:
        (grads, _), linear = jax.linearize(joint_grad, params, meta_params)
        return grads, lambda v: linear(v, meta_tangent)

    def hvp(v):
        return jax.jvp(joint_grad, (params, meta_params), (v, meta_tangent))[1]

    return grads, hvp


def _mixflow_step(problem: InnerProblem, config: MetaGradConfig):
    """The inner step with MixFlow-MG's custom VJP."""

    def loss_value(params, meta_params, data):
        return problem.loss(params, meta_params, data)[0]

    joint_grad = jax.grad(loss_value, argnums=(0, 1))

    @jax.custom_vjp
    def step(meta_params, state):
        return _inner_step(problem, meta_params, state)

    replay = config.replay_rollout and not config.store_rollout
    if replay and not problem.can_replay:
        raise MetaGradError(
            "replay_rollout needs an InnerProblem with record and replay; give "
            "them, or set replay_rollout=False to run the rollout again"
        )

    def step_fwd(meta_params, state):
        out, data, grads = _inner_step_with_intermediates(problem, meta_params, state)
        if replay:
            data = problem.record(data)
        elif not config.store_rollout:
            data = None
        residuals = (
            meta_params,
            state,
            data,
            grads if config.store_inner_grad else None,
        )
        return out, residuals

    def step_bwd(residuals, cotangents):
        meta_params, state, data, grads = residuals
        state_bar, _ = cotangents  # metrics and stats feed no meta-loss

        # Rebuild what was not stored: the rollout, then the inner gradient.
        _, rollout_key = _split_rollout_key(state.key)
        if replay:
            data = jax.lax.stop_gradient(problem.replay(data, state.env, rollout_key))
        elif data is None:
            data, _, _ = problem.rollout(state.params, state.env, rollout_key)
            data = jax.lax.stop_gradient(data)
        grads, hvp = _hessian_vector_products(
            lambda p, m: joint_grad(p, m, data), state.params, meta_params, grads
        )

        # Pull back through the optimiser: (g, s, theta, eta) -> (theta', s').
        def apply_optimizer(grads, opt_state, params, meta_params):
            updates, new_opt_state = problem.update(
                grads, opt_state, params, meta_params
            )
            return optax.apply_updates(params, updates), new_opt_state

        _, optimizer_vjp = jax.vjp(
            apply_optimizer, grads, state.opt_state, state.params, meta_params
        )
        params_bar = _float_cotangent(state_bar.params, state.params)
        opt_state_bar = _float_cotangent(state_bar.opt_state, state.opt_state)
        grads_bar, opt_state_bar, params_bar_direct, meta_bar_optimizer = optimizer_vjp(
            (params_bar, opt_state_bar)
        )

        # One forward-mode JVP of the joint gradient along (g_bar, 0) gives
        # H_thth g_bar and H_etath g_bar together.
        params_hvp, meta_hvp = hvp(grads_bar)

        params_bar = jax.tree.map(jnp.add, params_bar_direct, params_hvp)
        meta_bar = jax.tree.map(jnp.add, meta_bar_optimizer, meta_hvp)
        state_cotangent = InnerState(
            params=params_bar,
            opt_state=opt_state_bar,
            env=_zero_cotangent(state.env),
            key=_zero_cotangent(state.key),
        )
        return meta_bar, state_cotangent

    step.defvjp(step_fwd, step_bwd)
    return step


def make_step(
    problem: InnerProblem, config: MetaGradConfig
) -> Callable[[Any, InnerState], tuple[InnerState, Any]]:
    """The inner step `(meta_params, state) -> (state, (metrics, stats))`."""
    if config.mode == "mixflow":
        return _mixflow_step(problem, config)

    def step(meta_params, state):
        return _inner_step(problem, meta_params, state)

    if config.mode == "autodiff_remat":
        return jax.checkpoint(step)
    return step


def _scan_steps(step, meta_params, state, length: int):
    return jax.lax.scan(lambda s, _: step(meta_params, s), state, length=length)


def unroll(
    problem: InnerProblem,
    meta_params,
    state: InnerState,
    num_steps: int,
    config: MetaGradConfig = MetaGradConfig(),
) -> tuple[InnerState, Any]:
    """Applies `num_steps` inner updates, differentiably.

    Args:
      problem: the inner learner.
      meta_params: what the meta-gradient is taken with respect to.
      state: the inner learner's state before the first update.
      num_steps: `K`, the number of inner updates.
      config: how the unroll is differentiated.

    Returns:
      `(state_K, (metrics, stats))`, the last two with a leading `[K]` axis.
      Meta-gradients flow through `state_K`. The metrics and stats are for
      logging: under `mixflow` they carry no meta-gradient (its custom VJP
      passes cotangents back through the agent's state only), so a meta-loss
      must be computed from `state_K`, as the trainer's is, and not from them.

    Raises:
      MetaGradError: if `num_steps` is not a positive whole number, or the
        mode cannot handle the problem.
    """
    if not _is_whole_number(num_steps) or num_steps < 1:
        raise MetaGradError(
            f"meta.inner_steps must be a positive whole number, got {num_steps!r}"
        )
    step = make_step(problem, config)
    segment = config.checkpoint_every
    if not segment or segment >= num_steps:
        return _scan_steps(step, meta_params, state, num_steps)

    # Keep only each segment's first carry; recompute the segment when the
    # backward pass reaches it.
    num_segments, remainder = divmod(num_steps, segment)
    run_segment = jax.checkpoint(
        lambda m, s: _scan_steps(step, m, s, segment), prevent_cse=False
    )
    state, outputs = jax.lax.scan(
        lambda s, _: run_segment(meta_params, s), state, length=num_segments
    )
    outputs = jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:])), outputs)
    if remainder:
        state, rest = _scan_steps(step, meta_params, state, remainder)
        outputs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outputs, rest)
    return state, outputs
