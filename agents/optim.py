"""Optimisers for inner learners, safe to differentiate twice."""

import jax
import jax.numpy as jnp
import optax


def _safe_global_norm(tree) -> jax.Array:
    """The global norm, with a finite derivative at an all-zero input.

    `sqrt` has an infinite derivative at zero, so the plain norm turns an
    all-zero gradient into NaN meta-gradients; the double `where` keeps both
    branches finite.
    """
    sum_sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))
    positive = sum_sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)


def safe_clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Like `optax.clip_by_global_norm`, with finite derivatives at zero."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        norm = _safe_global_norm(updates)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, max_norm))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    name: str,
    learning_rate: float,
    max_grad_norm: float | None = None,
    eps: float = 1e-8,
    eps_root: float = 1e-8,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """An optax optimiser for the inner learner.

    Adam and RMSProp divide by `sqrt(nu + eps_root)`: with `eps_root > 0` the
    square root is never taken at zero, so second derivatives through it stay
    finite when a gradient coordinate is exactly zero.

    Args:
      name: "adam", "rmsprop" or "sgd".
      learning_rate: the step size.
      max_grad_norm: clip the gradient to this global norm first (None: no
        clipping).
      eps: the denominators' epsilon outside the square root.
      eps_root: the epsilon inside the square root.
      momentum: SGD momentum (0: none).
      weight_decay: decoupled weight decay added before scaling.

    Returns:
      An `optax.GradientTransformation`.

    Raises:
      ValueError: for an unknown name or a non-positive learning rate.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if name == "adam":
        core = optax.scale_by_adam(eps=eps, eps_root=eps_root)
    elif name == "rmsprop":
        # RMSProp's only epsilon sits inside the square root, as eps_root.
        core = optax.scale_by_rms(eps=eps_root, eps_in_sqrt=True)
    elif name == "sgd":
        core = optax.trace(decay=momentum) if momentum else optax.identity()
    else:
        raise ValueError(f"optimizer must be one of adam, rmsprop, sgd; got '{name}'")
    parts = []
    if max_grad_norm is not None:
        parts.append(safe_clip_by_global_norm(max_grad_norm))
    parts.append(core)
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale(-learning_rate))
    return optax.chain(*parts)
