"""Meta-gradients of `metarl.metagrad.unroll` against plain autodiff, in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agents import make_optimizer, safe_clip_by_global_norm
from metarl.config import (
    AgentConfig,
    EnvConfig,
    MetaConfig,
    OptimizerConfig,
    TrainConfig,
)
from metarl.metagrad import (
    InnerProblem,
    InnerState,
    MetaGradConfig,
    MetaGradError,
    from_optax,
    unroll,
)
from metarl.trainer import AgentMeta, Trainer

RTOL = 1e-10

OPTIMIZERS = {
    "sgd": lambda: make_optimizer("sgd", 0.1),
    "sgd_momentum": lambda: make_optimizer("sgd", 0.1, momentum=0.9),
    "adam": lambda: make_optimizer("adam", 0.05, eps_root=1e-8),
    "rmsprop": lambda: make_optimizer("rmsprop", 0.01, eps_root=1e-8),
    # A clipping norm below the gradients' norm, so the clip is active.
    "clip_adam_weight_decay": lambda: make_optimizer(
        "adam", 0.05, max_grad_norm=0.05, weight_decay=0.1
    ),
}


def _features(env, key):
    """The synthetic environment: Gaussian inputs shifted by a drifting offset."""
    x = jax.random.normal(key, (6, 3)) + env
    return x, env + 0.1


def _synthetic_rollout(params, env, key):
    """Inputs and targets that depend on the acting parameters, as in RL."""
    x, env = _features(env, key)
    # Targets from the current parameters: recomputing the rollout must
    # reproduce them exactly from the stored parameters, environment and key.
    y = jnp.sin(x @ jnp.ones((3, 2))) + 0.1 * jnp.tanh(x @ params["w"])
    stats = jnp.sum(y)
    return (x, jax.lax.stop_gradient(y)), env, stats


def _synthetic_loss(params, meta_params, data):
    """A smooth regression loss whose weights are meta-parameters."""
    x, y = data
    pred = jnp.tanh(x @ params["w"] + params["b"])
    per_output = jnp.mean(jnp.square(pred - y), axis=0)  # [2]
    weights = jnp.exp(meta_params["log_weights"])
    loss = jnp.sum(weights * per_output) + meta_params["l2"] * jnp.sum(
        jnp.square(params["w"])
    )
    return loss, {"loss": loss}


def _synthetic_state(optimizer, key=0):
    params_key, state_key = jax.random.split(jax.random.key(key))
    params = {
        "w": 0.5 * jax.random.normal(params_key, (3, 2)),
        "b": jnp.array([0.1, -0.2]),
    }
    return InnerState(
        params=params,
        opt_state=optimizer.init(params),
        env=jnp.zeros(()),
        key=state_key,
    )


SYNTHETIC_META_PARAMS = {
    "log_weights": jnp.array([0.3, -0.4]),
    "l2": jnp.array(0.05),
}


def _meta_loss(state):
    """A fixed outer objective of the updated parameters."""
    return jnp.sum(jnp.sin(state.params["w"])) + jnp.sum(state.params["b"] ** 3)


def _meta_gradient(problem, meta_params, state, num_steps, config):
    """Gradient of the meta-loss after the unroll, in the meta-parameters and
    the initial parameters."""

    def objective(meta_params, params):
        final, _ = unroll(
            problem, meta_params, state._replace(params=params), num_steps, config
        )
        return _meta_loss(final)

    return jax.jit(jax.grad(objective, argnums=(0, 1)))(meta_params, state.params)


def _assert_trees_close(actual, expected, rtol=RTOL):
    """Each leaf within `rtol` of the expected one, relative to its largest entry."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert np.all(np.isfinite(a)), a
        scale = max(np.max(np.abs(e)), 1e-300)
        np.testing.assert_array_less(np.max(np.abs(a - e)) / scale, rtol)


def _synthetic_case(optimizer_name):
    optimizer = OPTIMIZERS[optimizer_name]()
    problem = InnerProblem(_synthetic_rollout, _synthetic_loss, from_optax(optimizer))
    return problem, _synthetic_state(optimizer)


@functools.cache
def _autodiff_reference(optimizer_name, num_steps):
    problem, state = _synthetic_case(optimizer_name)
    return _meta_gradient(
        problem,
        SYNTHETIC_META_PARAMS,
        state,
        num_steps,
        MetaGradConfig(mode="autodiff"),
    )


def _check_against_autodiff(optimizer_name, num_steps, config):
    problem, state = _synthetic_case(optimizer_name)
    actual = _meta_gradient(problem, SYNTHETIC_META_PARAMS, state, num_steps, config)
    expected = _autodiff_reference(optimizer_name, num_steps)
    _assert_trees_close(actual, expected)
    return actual


def test_meta_gradient_is_not_trivially_zero():
    meta_grads, params_grads = _autodiff_reference("adam", 5)
    for leaf in jax.tree.leaves((meta_grads, params_grads)):
        assert np.min(np.abs(np.asarray(leaf))) > 1e-8


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_mixflow_matches_autodiff_for_optimizer(optimizer_name):
    _check_against_autodiff(optimizer_name, 5, MetaGradConfig(mode="mixflow"))


def test_autodiff_remat_matches_autodiff():
    _check_against_autodiff("adam", 5, MetaGradConfig(mode="autodiff_remat"))


def test_clip_is_active_in_the_clipped_optimizer():
    # The comparison above only exercises the clip if the gradient is clipped.
    problem, state = _synthetic_case("clip_adam_weight_decay")
    data, _, _ = problem.rollout(state.params, state.env, state.key)
    grads = jax.grad(lambda p: problem.loss(p, SYNTHETIC_META_PARAMS, data)[0])(
        state.params
    )
    assert optax.tree.norm(grads) > 0.05


@pytest.mark.parametrize("num_steps", [1, 16])
def test_mixflow_matches_autodiff_over_unroll_lengths(num_steps):
    _check_against_autodiff("adam", num_steps, MetaGradConfig(mode="mixflow"))


@pytest.mark.parametrize(
    ("mode", "num_steps", "checkpoint_every"),
    [
        ("mixflow", 16, 4),
        ("mixflow", 16, 5),
        ("mixflow", 5, 1),
        ("mixflow", 5, 8),
        ("autodiff", 16, 5),
        ("autodiff_remat", 16, 4),
    ],
    ids=[
        "mixflow_divides",
        "mixflow_remainder",
        "mixflow_every_step",
        "mixflow_longer_than_k",
        "autodiff_remainder",
        "autodiff_remat_divides",
    ],
)
def test_segment_checkpointing_matches_autodiff(mode, num_steps, checkpoint_every):
    config = MetaGradConfig(mode=mode, checkpoint_every=checkpoint_every)
    _check_against_autodiff("adam", num_steps, config)


@pytest.mark.parametrize(
    ("store_rollout", "store_inner_grad", "checkpoint_every"),
    [
        (False, False, 0),
        (True, False, 0),
        (False, True, 0),
        (True, True, 0),
        (True, True, 3),
    ],
)
def test_mixflow_residual_options_match_autodiff(
    store_rollout, store_inner_grad, checkpoint_every
):
    config = MetaGradConfig(
        mode="mixflow",
        checkpoint_every=checkpoint_every,
        store_rollout=store_rollout,
        store_inner_grad=store_inner_grad,
    )
    _check_against_autodiff("clip_adam_weight_decay", 7, config)


def _synthetic_record(data):
    """What the synthetic rollout's replay needs: the parameter-dependent targets."""
    _, y = data
    return y


def _synthetic_replay(record, env, key):
    """The synthetic rollout again from its targets: only the inputs are rebuilt."""
    x, _ = _features(env, key)
    return x, record


def _replayable_problem(optimizer_name, replay=_synthetic_replay):
    problem, state = _synthetic_case(optimizer_name)
    problem = InnerProblem(
        problem.rollout,
        problem.loss,
        problem.update,
        record=_synthetic_record,
        replay=replay,
    )
    return problem, state


@pytest.mark.parametrize(
    ("store_inner_grad", "checkpoint_every"), [(False, 0), (True, 0), (False, 3)]
)
def test_mixflow_with_replayed_rollout_matches_autodiff(
    store_inner_grad, checkpoint_every
):
    problem, state = _replayable_problem("clip_adam_weight_decay")
    config = MetaGradConfig(
        mode="mixflow",
        checkpoint_every=checkpoint_every,
        replay_rollout=True,
        store_inner_grad=store_inner_grad,
    )
    actual = _meta_gradient(problem, SYNTHETIC_META_PARAMS, state, 7, config)
    _assert_trees_close(actual, _autodiff_reference("clip_adam_weight_decay", 7))


def test_mixflow_backward_pass_reads_the_replayed_rollout():
    # A replay that rebuilds the wrong inputs changes the meta-gradient only
    # when the backward pass uses it: without replay_rollout, or with a stored
    # rollout, the rollout is run again or kept instead.
    def wrong_replay(record, env, key):
        x, y = _synthetic_replay(record, env, key)
        return 2.0 * x, y

    problem, state = _replayable_problem("adam", replay=wrong_replay)
    expected = _autodiff_reference("adam", 4)

    def meta_gradient(**options):
        config = MetaGradConfig(mode="mixflow", **options)
        return _meta_gradient(problem, SYNTHETIC_META_PARAMS, state, 4, config)

    replayed = meta_gradient(replay_rollout=True)
    error = max(
        float(np.max(np.abs(a - e)) / np.max(np.abs(e)))
        for a, e in zip(
            jax.tree.leaves(replayed), jax.tree.leaves(expected), strict=True
        )
    )
    assert error > 1e-3
    _assert_trees_close(meta_gradient(), expected)
    stored = meta_gradient(store_rollout=True, replay_rollout=True)
    _assert_trees_close(stored, expected)


def test_inner_problem_needs_record_and_replay_together():
    problem, _ = _synthetic_case("sgd")
    with pytest.raises(MetaGradError, match="both record and replay"):
        InnerProblem(
            problem.rollout, problem.loss, problem.update, record=_synthetic_record
        )


def test_replay_rollout_needs_a_problem_that_can_replay():
    problem, state = _synthetic_case("sgd")
    config = MetaGradConfig(mode="mixflow", replay_rollout=True)
    with pytest.raises(MetaGradError, match="replay_rollout=False"):
        unroll(problem, SYNTHETIC_META_PARAMS, state, 2, config)


def _data_only_rollout(params, env, key):
    """The synthetic rollout with targets that do not depend on the parameters."""
    del params
    x, env = _features(env, key)
    return (x, jnp.sin(x @ jnp.ones((3, 2)))), env, jnp.zeros(())


def _learned_lr_problem(rollout=_synthetic_rollout):
    """Adam whose step size is `exp(meta_params["log_lr"])`."""
    adam = optax.scale_by_adam(eps_root=1e-8)

    def update(grads, opt_state, params, meta_params):
        del params
        directions, opt_state = adam.update(grads, opt_state)
        step_size = jnp.exp(meta_params["log_lr"])
        return jax.tree.map(lambda d: -step_size * d, directions), opt_state

    problem = InnerProblem(rollout, _synthetic_loss, update)
    meta_params = {**SYNTHETIC_META_PARAMS, "log_lr": jnp.array(np.log(0.05))}
    return problem, meta_params, _synthetic_state(adam)


@pytest.mark.parametrize("checkpoint_every", [0, 3])
def test_mixflow_matches_autodiff_with_learned_learning_rate(checkpoint_every):
    problem, meta_params, state = _learned_lr_problem()
    expected = _meta_gradient(
        problem, meta_params, state, 8, MetaGradConfig(mode="autodiff")
    )
    config = MetaGradConfig(mode="mixflow", checkpoint_every=checkpoint_every)
    actual = _meta_gradient(problem, meta_params, state, 8, config)
    _assert_trees_close(actual, expected)
    assert abs(float(expected[0]["log_lr"])) > 1e-6


def test_mixflow_matches_central_finite_differences():
    # The meta-gradient treats the rollout as a constant, so only a rollout
    # that does not depend on the parameters makes it the total derivative
    # that finite differences see.
    problem, meta_params, state = _learned_lr_problem(_data_only_rollout)
    num_steps, config = 6, MetaGradConfig(mode="mixflow", checkpoint_every=4)
    meta_grads, _ = _meta_gradient(problem, meta_params, state, num_steps, config)

    @jax.jit
    def objective(meta_params):
        final, _ = unroll(problem, meta_params, state, num_steps, config)
        return _meta_loss(final)

    # Directional derivative along a fixed direction touching every
    # meta-parameter, against the central difference quotient.
    direction = {
        "log_weights": jnp.array([0.6, -0.3]),
        "l2": jnp.array(0.5),
        "log_lr": jnp.array(-0.55),
    }
    step = 1e-5
    plus = jax.tree.map(lambda m, d: m + step * d, meta_params, direction)
    minus = jax.tree.map(lambda m, d: m - step * d, meta_params, direction)
    finite_difference = (objective(plus) - objective(minus)) / (2 * step)
    analytic = sum(
        jnp.sum(g * d)
        for g, d in zip(
            jax.tree.leaves(meta_grads), jax.tree.leaves(direction), strict=True
        )
    )
    np.testing.assert_allclose(analytic, finite_difference, rtol=1e-7)


def test_unroll_returns_stacked_metrics_and_stats_for_every_step():
    problem, state = _synthetic_case("sgd")
    config = MetaGradConfig(mode="mixflow", checkpoint_every=3)
    final, (metrics, stats) = unroll(problem, SYNTHETIC_META_PARAMS, state, 7, config)
    reference, (ref_metrics, ref_stats) = unroll(
        problem, SYNTHETIC_META_PARAMS, state, 7, MetaGradConfig(mode="autodiff")
    )
    assert metrics["loss"].shape == (7,)
    assert stats.shape == (7,)
    np.testing.assert_array_equal(metrics["loss"], ref_metrics["loss"])
    np.testing.assert_array_equal(stats, ref_stats)
    np.testing.assert_array_equal(final.params["w"], reference.params["w"])


def test_unroll_rejects_non_positive_steps():
    problem, state = _synthetic_case("sgd")
    with pytest.raises(MetaGradError, match="inner_steps"):
        unroll(problem, SYNTHETIC_META_PARAMS, state, 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"checkpoint_every": 1.5}, "checkpoint_every must be a whole number"),
        ({"checkpoint_every": "2"}, "checkpoint_every must be a whole number"),
        ({"checkpoint_every": True}, "checkpoint_every must be a whole number"),
        ({"replay_rollout": "yes"}, "replay_rollout must be true or false"),
        ({"store_inner_grad": 1}, "store_inner_grad must be true or false"),
    ],
)
def test_config_rejects_settings_of_the_wrong_type(options, message):
    with pytest.raises(MetaGradError, match=message):
        MetaGradConfig(mode="mixflow", **options)


@pytest.mark.parametrize("num_steps", [2.5, "3", True])
def test_unroll_rejects_steps_that_are_not_whole_numbers(num_steps):
    problem, state = _synthetic_case("sgd")
    with pytest.raises(MetaGradError, match="positive whole number"):
        unroll(problem, SYNTHETIC_META_PARAMS, state, num_steps)


def test_config_rejects_unknown_mode():
    with pytest.raises(MetaGradError, match="meta.grad"):
        MetaGradConfig(mode="reverse")


# Hazards.


def _dead_coordinate_loss(params, meta_params, data):
    """`w[1]` starts at zero with a zero gradient there, so it never moves: its
    gradient, Adam's `mu` and `nu` stay exactly zero, while its curvature
    `2 exp(log_c)` is not zero."""
    x, y = data
    w = params["w"]
    pred = jnp.tanh(x[:, 0] * w[0] + meta_params["shift"])
    loss = jnp.mean(jnp.square(pred - y)) + jnp.exp(meta_params["log_c"]) * w[1] ** 2
    return loss, {}


def _dead_coordinate_gradient(optimizer, mode):
    def rollout(params, env, key):
        del params
        x = jax.random.normal(key, (5, 2))
        return (x, jnp.sin(x[:, 0])), env, jnp.zeros(())

    problem = InnerProblem(rollout, _dead_coordinate_loss, from_optax(optimizer))
    params = {"w": jnp.array([0.3, 0.0])}
    state = InnerState(params, optimizer.init(params), jnp.zeros(()), jax.random.key(1))
    meta_params = {"shift": jnp.array(0.1), "log_c": jnp.array(0.0)}

    def objective(meta_params, params):
        final, _ = unroll(
            problem,
            meta_params,
            state._replace(params=params),
            4,
            MetaGradConfig(mode=mode),
        )
        return jnp.sum(final.params["w"] ** 2 + final.params["w"])

    return jax.jit(jax.grad(objective, argnums=(0, 1)))(meta_params, params)


def _all_finite(tree):
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def test_adam_with_eps_root_gives_finite_meta_gradient_at_zero_gradient():
    optimizer = make_optimizer("adam", 0.05, eps_root=1e-8)
    mixflow = _dead_coordinate_gradient(optimizer, "mixflow")
    assert _all_finite(mixflow)
    _assert_trees_close(mixflow, _dead_coordinate_gradient(optimizer, "autodiff"))


def test_adam_without_eps_root_is_not_finite_at_zero_gradient():
    # Shows that the problem above does reach the hazard that eps_root removes.
    optimizer = make_optimizer("adam", 0.05, eps_root=0.0)
    assert not _all_finite(_dead_coordinate_gradient(optimizer, "mixflow"))


def _zero_gradient_meta_gradient(clip, mode):
    """Parameters at zero with a loss even in them: every inner gradient is zero."""

    def rollout(params, env, key):
        del params
        return jax.random.normal(key, (4,)), env, jnp.zeros(())

    def loss(params, meta_params, data):
        w = params["w"]
        value = meta_params["scale"] * jnp.sum(jnp.square(w) * (1.0 + data[:2]))
        return value, {}

    optimizer = optax.chain(clip, optax.sgd(0.1))
    problem = InnerProblem(rollout, loss, from_optax(optimizer))
    params = {"w": jnp.zeros(2)}
    state = InnerState(params, optimizer.init(params), jnp.zeros(()), jax.random.key(2))

    def objective(meta_params, params):
        final, _ = unroll(
            problem,
            meta_params,
            state._replace(params=params),
            3,
            MetaGradConfig(mode=mode),
        )
        return jnp.sum(jnp.sin(final.params["w"] + 0.5))

    return jax.grad(objective, argnums=(0, 1))({"scale": jnp.array(1.0)}, params)


@pytest.mark.parametrize("mode", ["mixflow", "autodiff"])
def test_safe_clip_gives_finite_meta_gradient_at_all_zero_gradient(mode):
    meta_grads, params_grads = _zero_gradient_meta_gradient(
        safe_clip_by_global_norm(1.0), mode
    )
    assert np.isfinite(meta_grads["scale"])
    # At w = 0 the update's Jacobian is I - 0.2 * scale * diag(1 + x), finite
    # and non-zero: the initial-parameter gradient must be finite and non-zero.
    grads = np.asarray(params_grads["w"])
    assert np.all(np.isfinite(grads))
    assert np.min(np.abs(grads)) > 1e-3


def test_safe_clip_matches_unclipped_sgd_at_all_zero_gradient():
    # Below the clipping norm the clip is the identity, and so is its Jacobian.
    clipped = _zero_gradient_meta_gradient(safe_clip_by_global_norm(1.0), "mixflow")
    plain = _zero_gradient_meta_gradient(optax.identity(), "autodiff")
    _assert_trees_close(clipped, plain)


def test_optax_clip_by_global_norm_is_not_finite_at_all_zero_gradient():
    # Why agents use the safe clip: optax's own divides by the zero norm.
    meta_grads, params_grads = _zero_gradient_meta_gradient(
        optax.clip_by_global_norm(1.0), "autodiff"
    )
    assert not _all_finite((meta_grads, params_grads))


def test_safe_clip_matches_optax_clip_away_from_zero():
    updates = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([[1.0, 2.0]])}
    for max_norm in (0.5, 100.0):
        ours, _ = safe_clip_by_global_norm(max_norm).update(updates, optax.EmptyState())
        theirs, _ = optax.clip_by_global_norm(max_norm).update(
            updates, optax.EmptyState()
        )
        _assert_trees_close(ours, theirs, rtol=1e-15)


@jax.custom_vjp
def _clipped_identity(x):
    return x


def _clipped_identity_fwd(x):
    # Calling the primal function here, as custom VJPs usually do, is what
    # forward mode cannot differentiate.
    return _clipped_identity(x), None


def _clipped_identity_bwd(_, cotangent):
    return (jnp.clip(cotangent, -1.0, 1.0),)


_clipped_identity.defvjp(_clipped_identity_fwd, _clipped_identity_bwd)


def _custom_vjp_loss(params, meta_params, data):
    x, y = data
    pred = _clipped_identity(jnp.tanh(x @ params["w"] + params["b"]))
    weights = jnp.exp(meta_params["log_weights"])
    return jnp.sum(weights * jnp.mean(jnp.square(pred - y), axis=0)), {}


def test_custom_vjp_in_inner_loss_raises_meta_grad_error_under_mixflow():
    optimizer = make_optimizer("sgd", 0.1)
    problem = InnerProblem(_synthetic_rollout, _custom_vjp_loss, from_optax(optimizer))
    state = _synthetic_state(optimizer)
    with pytest.raises(MetaGradError, match="meta.grad=autodiff"):
        _meta_gradient(
            problem, SYNTHETIC_META_PARAMS, state, 3, MetaGradConfig(mode="mixflow")
        )


def test_custom_vjp_in_inner_loss_works_under_autodiff():
    optimizer = make_optimizer("sgd", 0.1)
    problem = InnerProblem(_synthetic_rollout, _custom_vjp_loss, from_optax(optimizer))
    state = _synthetic_state(optimizer)
    meta_grads, _ = _meta_gradient(
        problem, SYNTHETIC_META_PARAMS, state, 3, MetaGradConfig(mode="autodiff")
    )
    assert np.all(np.isfinite(np.asarray(meta_grads["log_weights"])))
    assert np.min(np.abs(np.asarray(meta_grads["log_weights"]))) > 1e-8


# The agents' trainer on a real environment.


def _tiny_trainer(env_name, optimizer_name):
    config = TrainConfig(
        env=EnvConfig(name=env_name),
        agent=AgentConfig(
            num_envs=2,
            unroll_length=4,
            hidden_sizes=(8,),
            optimizer=_agent_optimizer(optimizer_name),
        ),
        meta=MetaConfig(inner_steps=5, population_size=1),
        dtype="float64",
    )
    trainer = Trainer(config)
    state = trainer.init(0)
    inner = jax.tree.map(lambda x: x[0], state.population[0].inner)
    return trainer, state.meta_params, inner


def _agent_optimizer(name):
    if name == "adam_clip":
        return OptimizerConfig(name="adam", learning_rate=0.01, max_grad_norm=0.1)
    return OptimizerConfig(name=name, learning_rate=0.01)


def _trainer_meta_gradient(trainer, meta_params, inner, config):
    trainer.grad_config = config
    (group,) = trainer.groups
    rate = jnp.asarray(group.learning_rates[0])
    loss = lambda m: trainer.agent_meta_loss(group, AgentMeta(m, rate), inner)[0]  # noqa: E731
    return jax.jit(jax.grad(loss))(meta_params)


def test_trainer_meta_gradient_matches_autodiff_on_cartpole():
    # Segments of two with a remainder, and rollouts recomputed from the
    # stored environment state and key: the paths where a real environment
    # must replay exactly.
    trainer, meta_params, inner = _tiny_trainer("cartpole", "adam_clip")
    expected = _trainer_meta_gradient(
        trainer, meta_params, inner, MetaGradConfig(mode="autodiff")
    )
    config = MetaGradConfig(mode="mixflow", checkpoint_every=2)
    actual = _trainer_meta_gradient(trainer, meta_params, inner, config)
    _assert_trees_close(actual, expected)
    for name in ("discount_logit", "lambda_logit", "log_entropy_coef"):
        assert abs(float(expected[name])) > 1e-8
