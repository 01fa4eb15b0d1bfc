"""Non-finite agent updates are skipped; the guard leaves meta-gradients alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agents import make_optimizer
from metarl.guard import SkipStreak, all_finite, skip_nonfinite, skipped_updates
from metarl.metagrad import InnerProblem, InnerState, MetaGradConfig, from_optax, unroll


def _params():
    return {"w": jnp.array([0.3, -1.2, 0.7]), "b": jnp.array(0.1)}


def test_nonfinite_gradient_leaves_params_and_state_unchanged_and_is_counted():
    optimizer = skip_nonfinite(optax.adam(0.1))
    params = _params()
    state = optimizer.init(params)
    good = jax.tree.map(jnp.ones_like, params)
    updates, state = optimizer.update(good, state, params)
    params = optax.apply_updates(params, updates)
    assert int(skipped_updates(state)) == 0

    bad = {"w": jnp.array([1.0, jnp.nan, 1.0]), "b": jnp.array(1.0)}
    new_updates, new_state = optimizer.update(bad, state, params)
    new_params = optax.apply_updates(params, new_updates)

    for before, after in zip(
        jax.tree.leaves(params), jax.tree.leaves(new_params), strict=True
    ):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(
        jax.tree.leaves(state.inner_state),
        jax.tree.leaves(new_state.inner_state),
        strict=True,
    ):
        np.testing.assert_array_equal(before, after)
    assert int(skipped_updates(new_state)) == 1

    # An infinite gradient is refused too, and the count keeps adding up.
    inf = {"w": jnp.array([1.0, 1.0, 1.0]), "b": jnp.array(jnp.inf)}
    _, newer_state = optimizer.update(inf, new_state, params)
    assert int(skipped_updates(newer_state)) == 2


def test_finite_update_is_the_wrapped_optimizers_exactly():
    inner = make_optimizer("adam", 0.05)
    guarded = skip_nonfinite(inner)
    params = _params()
    grads = {"w": jnp.array([0.5, -0.25, 2.0]), "b": jnp.array(-1.0)}
    expected, _ = inner.update(grads, inner.init(params), params)
    got, _ = guarded.update(grads, guarded.init(params), params)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


def _toy_problem(optimizer, poison_step=None):
    """A smooth inner loss whose data, held in the environment slot, can be NaN."""

    def rollout(params, env, key):
        del params, key
        step, target = env
        data = jnp.where(step == poison_step, jnp.nan, target)
        return data, (step + 1, target), jnp.zeros(())

    def loss(params, meta_params, data):
        residual = params["w"] - data
        value = jnp.exp(meta_params["log_scale"]) * jnp.sum(jnp.tanh(residual) ** 2)
        value = value + meta_params["shift"] * jnp.sum(jnp.sin(params["w"])) ** 2
        return value + jnp.square(params["b"] - data[0]), {"loss/total": value}

    return InnerProblem(rollout=rollout, loss=loss, update=from_optax(optimizer))


def _meta_grad(optimizer, mode, num_steps=4, poison_step=None):
    problem = _toy_problem(optimizer, poison_step)
    params = _params()
    state = InnerState(
        params=params,
        opt_state=optimizer.init(params),
        env=(jnp.array(0), jnp.array([1.0, 0.5, -0.5])),
        key=jax.random.key(0),
    )
    meta_params = {"log_scale": jnp.array(0.2), "shift": jnp.array(0.3)}

    def meta_loss(meta_params):
        final, _ = unroll(
            problem, meta_params, state, num_steps, MetaGradConfig(mode=mode)
        )
        return jnp.sum(final.params["w"] ** 2) + final.params["b"] ** 2, final

    value_and_grad = jax.jit(jax.value_and_grad(meta_loss, has_aux=True))
    (value, final), grads = value_and_grad(meta_params)
    return value, final, grads


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_guard_keeps_mixflow_and_autodiff_meta_gradients(name):
    """Forward-over-reverse (MixFlow-MG) and reverse-over-reverse give the same
    meta-gradient through the guarded optimiser as through the bare one."""
    bare = make_optimizer(name, 0.05, momentum=0.9 if name == "sgd" else 0.0)
    guarded = skip_nonfinite(bare)
    reference = _meta_grad(bare, "autodiff")[2]
    for optimizer in (bare, guarded):
        for mode in ("mixflow", "autodiff"):
            grads = _meta_grad(optimizer, mode)[2]
            for key in reference:
                assert bool(jnp.isfinite(grads[key]))
                np.testing.assert_allclose(
                    grads[key], reference[key], rtol=1e-10, atol=1e-14
                )
    assert float(jnp.abs(reference["shift"])) > 0


def test_guard_is_twice_differentiable():
    """Second derivatives of a guarded update exist and equal the bare ones."""
    bare = make_optimizer("adam", 0.05)
    guarded = skip_nonfinite(bare)
    params = _params()

    def one_step(optimizer, scale):
        grads = jax.tree.map(lambda p: scale * jnp.sin(p) + scale**2, params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return sum(jnp.sum(u) for u in jax.tree.leaves(updates))

    # Forward over reverse, as MixFlow-MG differentiates.
    expected = jax.jit(jax.jacfwd(jax.grad(lambda s: one_step(bare, s))))(0.7)
    got = jax.jit(jax.jacfwd(jax.grad(lambda s: one_step(guarded, s))))(0.7)
    assert bool(jnp.isfinite(got)) and float(jnp.abs(got)) > 0
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_poisoned_inner_step_is_skipped_inside_the_unroll():
    optimizer = skip_nonfinite(make_optimizer("adam", 0.05))
    _, clean, _ = _meta_grad(optimizer, "mixflow", num_steps=2)
    value, poisoned, grads = _meta_grad(
        optimizer, "mixflow", num_steps=3, poison_step=2
    )
    # The third update saw NaN data: it changed nothing and was counted.
    assert int(skipped_updates(poisoned.opt_state)) == 1
    for a, b in zip(
        jax.tree.leaves(clean.params), jax.tree.leaves(poisoned.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert bool(jnp.isfinite(value))
    assert bool(all_finite(poisoned.params))


def test_skip_streak_counts_only_skips_in_a_row():
    streak = SkipStreak(limit=3)
    history = []
    for skipped in [True, True, False, True, True, True, False]:
        streak.update(skipped)
        history.append((streak.count, streak.tripped))
    assert history == [
        (1, False),
        (2, False),
        (0, False),
        (1, False),
        (2, False),
        (3, True),
        (0, False),
    ]
    assert SkipStreak(limit=2, count=1).count == 1
