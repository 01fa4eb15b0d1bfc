"""Measures a sharded meta-step against one device, in a process of its own.

`tests/test_sharding.py` runs this with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`, which has to be set
before JAX starts. It prints one JSON object of measurements for the tests to
assert on: errors against the one-device run, the shardings of the state, the
first actions on each device.
"""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarl.config import ConfigError, TrainConfig, from_dict
from metarl.trainer import Trainer

jax.config.update("jax_enable_x64", True)

# Adam is left unclipped so that its first moment after one meta-step is
# exactly (1 - b1) times the meta-gradient.
CONFIG = {
    "env": {"name": "cartpole"},
    "agent": {"num_envs": 2, "unroll_length": 4, "hidden_sizes": [8]},
    "meta": {"inner_steps": 2, "population_size": 8, "max_grad_norm": None},
    "dtype": "float64",
}


def _relative_errors(tree, reference) -> list[float]:
    """Per-leaf `|a - b| / |b|` of the float leaves of two trees.

    A leaf whose reference is exactly zero gets `|a|`: the value-loss weight
    reaches the meta-loss only through the value network, which the meta-loss
    does not differentiate, so its meta-gradient is exactly zero.
    """
    errors = []
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind == "f":
            scale = np.linalg.norm(b)
            error = np.linalg.norm(a - b)
            errors.append(float(error / scale if scale > 0 else error))
    return errors


def _to_host(tree):
    """Host copies; typed keys become their raw data."""

    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(leaf, tree)


def _describe_sharding(tree) -> list[dict]:
    """For each leaf: its spec, the leading size and device of every shard."""
    out = []
    for x in jax.tree.leaves(tree):
        out.append(
            {
                "spec": str(x.sharding.spec),
                "fully_replicated": bool(x.sharding.is_fully_replicated),
                "shape": list(x.shape),
                "shards": [
                    {
                        "device": shard.device.id,
                        "start": shard.index[0].start if x.ndim else None,
                        "size": shard.data.shape[0] if x.ndim else None,
                    }
                    for shard in x.addressable_shards
                ],
            }
        )
    return out


def _first_actions_by_device(trainer: Trainer, inner) -> list[list]:
    """The actions of each device's agents in the first inner step's rollout."""

    def first_actions(agent):
        # The first inner step acts with the second half of the agent's key.
        _, rollout_key = jax.random.split(agent.key)
        rollout = trainer.groups[0].problem.rollout
        trajectory, _, _ = rollout(agent.params, agent.env, rollout_key)
        return trajectory.actions  # [T, B]

    actions = jax.jit(jax.vmap(first_actions), out_shardings=trainer.layout.sharded)(
        inner
    )
    by_device = {shard.device.id: shard for shard in actions.addressable_shards}
    return [
        np.asarray(by_device[device.id].data).tolist()
        for device in trainer.layout.mesh.devices.flat
    ]


def _all_differ(per_device: list[list]) -> bool:
    return all(a != b for a, b in itertools.combinations(per_device, 2))


def main() -> None:
    config = from_dict(TrainConfig, CONFIG)
    sharded = Trainer(config)
    single = Trainer(config, devices=jax.devices()[:1])
    report = {"devices": sharded.layout.num_devices}

    # The same seed gives the same population on four devices and on one.
    state = sharded.init(0)
    reference = single.init(0)
    report["init_errors"] = [
        float(np.max(np.abs(a.astype(np.float64) - b)))
        for a, b in zip(
            jax.tree.leaves(_to_host(state.population)),
            jax.tree.leaves(_to_host(reference.population)),
            strict=True,
        )
    ]
    report["init_population"] = _describe_sharding(state.population)
    report["init_replicated"] = _describe_sharding(
        (state.meta_params, state.meta_opt_state, state.step)
    )

    # First actions per device, and a control population of identical agents.
    report["actions"] = _first_actions_by_device(sharded, state.population[0].inner)
    clones = jax.tree.map(
        lambda x: jnp.broadcast_to(x[:1], x.shape), state.population[0].inner
    )
    report["clone_actions"] = _first_actions_by_device(sharded, clones)
    report["actions_differ"] = _all_differ(report["actions"])
    report["clone_actions_differ"] = _all_differ(report["clone_actions"])

    # One meta-step each; the state is donated, so read it before and after.
    state, metrics = sharded.meta_step(state)
    reference, reference_metrics = single.meta_step(reference)
    report["step_population"] = _describe_sharding(state.population)
    report["step_replicated"] = _describe_sharding(
        (state.meta_params, state.meta_opt_state)
    )
    report["metrics_devices"] = sorted(
        {d.id for x in jax.tree.leaves(metrics) for d in x.sharding.device_set}
    )
    mu = optax.tree_utils.tree_get(_to_host(state.meta_opt_state), "mu")
    mu_reference = optax.tree_utils.tree_get(_to_host(reference.meta_opt_state), "mu")
    report["grad_errors"] = _relative_errors(mu, mu_reference)
    report["grad_norm_from_adam"] = float(optax.tree.norm(mu)) / (1 - 0.9)
    report["grad_norm"] = float(metrics["meta/grad_norm"])
    report["metric_errors"] = {
        key: abs(float(metrics[key]) - float(reference_metrics[key]))
        / abs(float(reference_metrics[key]))
        for key in ("meta/loss", "meta/grad_norm")
    }
    report["population_errors"] = _relative_errors(
        _to_host(state.population[0].inner.params),
        _to_host(reference.population[0].inner.params),
    )

    # A population that does not divide over the devices.
    try:
        Trainer(from_dict(TrainConfig, {**CONFIG, "meta": {"population_size": 6}}))
        report["uneven_error"] = None
    except ConfigError as error:
        report["uneven_error"] = str(error)

    print(json.dumps(report))


if __name__ == "__main__":
    main()
