"""Populations that span several environments, learning rates and lifetimes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from metarl.cli import expand_env_list
from metarl.config import (
    ConfigError,
    EnvConfig,
    OptimizerConfig,
    TrainConfig,
    from_dict,
    population_plan,
)
from metarl.metagrad import MetaGradConfig, unroll
from metarl.train import check_command, describe_population
from metarl.trainer import AgentMeta, Trainer


def _mixed_config(grad: str = "mixflow", optimizer: str = "adam") -> TrainConfig:
    """Catch and CartPole (other observation shapes and action counts), two
    learning rates and two lifetimes: 4 agents per environment."""
    config = tiny_config(grad=grad, population_size=8, lifetime=(2, 64))
    return dataclasses.replace(
        config,
        env=EnvConfig(name=("catch", "cartpole")),
        agent=dataclasses.replace(
            config.agent,
            optimizer=OptimizerConfig(name=optimizer, learning_rate=(0.05, 0.01)),
        ),
    )


@pytest.fixture(scope="module")
def mixed():
    trainer = Trainer(_mixed_config())
    return trainer, trainer.init(seed=3)


def test_plan_pairs_every_learning_rate_with_every_lifetime():
    plan = population_plan(_mixed_config())
    assert [name for name, _, _ in plan] == ["catch", "cartpole"]
    for _, rates, lifetimes in plan:
        assert rates == [0.05, 0.01, 0.05, 0.01]
        assert lifetimes == [2, 2, 64, 64]
        assert len(set(zip(rates, lifetimes, strict=True))) == 4


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"env": {"name": ["catch", "cartpole"]}, "meta": {"population_size": 3}},
            "meta.population_size=3 does not split evenly between the 2 "
            "environments; use e.g. meta.population_size=4",
        ),
        (
            {
                "agent": {"optimizer": {"learning_rate": [1e-3, 3e-4]}},
                "meta": {"population_size": 4, "lifetime": [100, 200, 300]},
            },
            "meta.population_size=4 is too small for one agent per learning rate "
            "and lifetime (2 x 3); use e.g. meta.population_size=6",
        ),
        ({"env": {"name": []}}, "env.name must not be an empty list"),
        ({"env": {"name": ["catch", "nope"]}}, "env.name must be one of"),
        ({"env": {"name": ["catch", "catch"]}}, "env.name lists a value twice"),
        ({"meta": {"lifetime": [10, -1]}}, "meta.lifetime must be positive, got -1"),
        (
            {
                "env": {"name": ["catch", "cartpole"]},
                "meta": {"population_size": 2, "lifetime": [100, 200]},
            },
            "meta.population_size=2 is too small for one agent per learning rate "
            "and lifetime (1 x 2 per environment x 2 environments); use e.g. "
            "meta.population_size=4",
        ),
        (
            {"agent": {"optimizer": {"learning_rate": [0.1, "fast"]}}},
            "agent.optimizer.learning_rate[1] must be a number, got 'fast'",
        ),
    ],
)
def test_bad_population_settings_are_config_errors(values, message):
    with pytest.raises(ConfigError) as error:
        from_dict(TrainConfig, values)
    assert str(error.value).startswith(message)


def test_env_list_on_the_command_line_becomes_a_list_of_names():
    argv = ["env=[catch, cartpole]", "meta.population_size=4"]
    expanded = expand_env_list(argv)
    assert expanded == ["env=catch", "env.name=[catch,cartpole]", argv[1]]
    assert check_command(argv) == expanded


def test_env_list_with_unknown_name_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as stop:
        check_command(["env=[catch,nosuchgame]", "meta.population_size=4"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "metarl: error: env.name must be one of acrobot, asterix, breakout, "
        "cartpole, catch, freeway, seaquest, space_invaders; got 'nosuchgame'"
    ]


def test_each_environment_gets_its_own_networks_and_agents(mixed):
    trainer, state = mixed
    assert trainer.env_names == ("catch", "cartpole")
    assert len(state.population) == 2
    catch, cartpole = state.population
    # Four agents each; Catch sees a 10 x 5 grid and CartPole four numbers,
    # so their first layers (8 units) differ.
    kernels = [
        agents.inner.params["params"]["Dense_0"]["kernel"]
        for agents in (catch, cartpole)
    ]
    assert [k.shape for k in kernels] == [(4, 50, 8), (4, 4, 8)]
    # Ages are staggered over each agent's own lifetime (2, 2, 64, 64).
    for agents in state.population:
        np.testing.assert_array_equal(np.asarray(agents.age), [0, 0, 32, 48])
    assert describe_population(trainer) == (
        "catch 4 agents (learning rates 0.05, 0.01; lifetimes 2, 64); "
        "cartpole 4 agents (learning rates 0.05, 0.01; lifetimes 2, 64)"
    )


def test_meta_step_resets_by_each_agents_lifetime_and_reports_each_env(mixed):
    trainer, state = mixed
    before = jax.device_get(state.meta_params)
    state, metrics = trainer.meta_step(state)
    # Two inner updates reach the lifetime of 2 of the first two agents of
    # each environment, and no one else's.
    assert int(metrics["agent/resets"]) == 4
    for agents in state.population:
        np.testing.assert_array_equal(np.asarray(agents.age), [0, 0, 34, 50])
    for env in ("catch", "cartpole"):
        for key in ("return_sum", "length_sum", "count"):
            assert f"episode/{env}/{key}" in metrics
    total = sum(int(metrics[f"episode/{env}/count"]) for env in trainer.env_names)
    assert total == int(metrics["episode/count"]) > 0
    after = jax.device_get(state.meta_params)
    assert all(np.isfinite(after[k]) for k in after)
    assert any(before[k] != after[k] for k in before)


def test_mixed_population_mixflow_matches_autodiff_float64():
    grads = {}
    for mode in ("mixflow", "autodiff"):
        trainer = Trainer(_mixed_config(grad=mode))
        _, grads[mode] = jax.jit(trainer.meta_gradient)(trainer.init(seed=1))
    for name in grads["autodiff"]:
        expected, actual = grads["autodiff"][name], grads["mixflow"][name]
        assert abs(float(expected)) > 0.0, name
        assert abs(float(actual - expected)) <= 1e-10 * abs(float(expected)), name


def test_each_agent_steps_with_its_own_learning_rate():
    trainer = Trainer(_mixed_config(optimizer="sgd"))
    state = trainer.init(seed=0)
    group = trainer.groups[0]
    agents = state.population[0].inner
    # The same agent, stepped once with each learning rate of the group.
    agent = jax.tree.map(lambda x: x[0], agents)
    deltas = []
    for rate in (0.05, 0.01):
        meta = AgentMeta(state.meta_params, jnp.asarray(rate, group.dtype))
        stepped, _ = unroll(group.problem, meta, agent, 1, MetaGradConfig("autodiff"))
        deltas.append(
            jax.tree.map(lambda new, old: new - old, stepped.params, agent.params)
        )
    for fast, slow in zip(*map(jax.tree.leaves, deltas), strict=True):
        np.testing.assert_allclose(fast, 5.0 * slow, rtol=1e-10, atol=1e-300)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(deltas[0]))
    np.testing.assert_array_equal(
        np.asarray(group.agent_meta(state.meta_params).learning_rate),
        [0.05, 0.01, 0.05, 0.01],
    )
