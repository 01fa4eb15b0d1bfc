"""The population of agents laid out over every device: mesh, shardings, keys.

The mesh has one axis, `agents`, over all devices of all processes
(`jax.devices()`). The population's leading axis is split over it, each device
holding `population_size / num_devices` agents; the meta-parameters, the
meta-optimiser state and the counters are replicated. The meta-step remains a
single `jax.jit` program over these global arrays: XLA partitions the vmapped
agents by their sharding, and the mean of the meta-loss over the population,
and so the meta-gradient, becomes an all-reduce across devices.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from metarl.config import ConfigError

AXIS = "agents"


def check_population_size(
    population_size: int, num_devices: int, groups: int = 1
) -> None:
    """Checks that the population splits evenly over the devices.

    Args:
      population_size: the number of agents, `meta.population_size`.
      num_devices: the number of devices over all processes.
      groups: the environments the population is split between first; each
        one's agents are split over the devices.

    Raises:
      ConfigError: if `groups * num_devices` does not divide
        `population_size`; the message names the nearest sizes that work.
    """
    unit = groups * num_devices
    if population_size % unit == 0:
        return
    below = population_size // unit * unit
    above = below + unit
    sizes = " or ".join(str(n) for n in (below, above) if n > 0)
    over = f"{num_devices} devices"
    if groups > 1:
        over = f"{groups} environments x {num_devices} devices"
    raise ConfigError(
        f"meta.population_size={population_size} does not split evenly over "
        f"{over}; use a multiple of {unit}, e.g. meta.population_size={sizes}"
    )


@dataclasses.dataclass(frozen=True)
class PopulationLayout:
    """Where the population and the replicated state live.

    Attributes:
      mesh: the one-axis device mesh, axis `agents`.
      population_size: the number of agents over all devices.
    """

    mesh: Mesh
    population_size: int

    @property
    def num_devices(self) -> int:
        """Devices over all processes."""
        return self.mesh.size

    @property
    def agents_per_device(self) -> int:
        """Agents each device holds."""
        return self.population_size // self.mesh.size

    @property
    def replicated(self) -> NamedSharding:
        """A full copy on every device."""
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def sharded(self) -> NamedSharding:
        """The leading axis split over the devices."""
        return NamedSharding(self.mesh, PartitionSpec(AXIS))

    def state_shardings(self, state: Any) -> Any:
        """Shardings for a state whose `population` field holds the agents.

        Args:
          state: a NamedTuple (or its `jax.eval_shape`) with a `population`
            field whose leaves have agents as leading axis (one tree, or a
            tuple of trees for agents in several environments).

        Returns:
          A tree like `state` of `NamedSharding`s: the leaves of
          `state.population` split on their leading axis, all others
          replicated.
        """
        shardings = jax.tree.map(lambda _: self.replicated, state)
        return shardings._replace(
            population=jax.tree.map(lambda _: self.sharded, state.population)
        )


def make_layout(
    population_size: int,
    devices: Sequence[jax.Device] | None = None,
    groups: int = 1,
) -> PopulationLayout:
    """The layout of `population_size` agents over `devices`.

    Args:
      population_size: the number of agents.
      devices: the devices to use; all of them, over all processes, if None.
      groups: the environments the agents are split between; each one's
        agents are split over the devices.

    Returns:
      A `PopulationLayout` whose mesh spans `devices`.

    Raises:
      ConfigError: if the population does not split evenly over the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    check_population_size(population_size, len(devices), groups)
    # Auto axes let XLA propagate the population's sharding through the
    # unchanged agent and environment code; explicit axes would need a
    # sharding rule for every operation the environments use.
    mesh = jax.make_mesh(
        (len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )
    return PopulationLayout(mesh=mesh, population_size=population_size)


def agent_keys(seed: int | jax.Array, population_size: int) -> jax.Array:
    """One random key per agent, from the run seed and the agent's place.

    Agent `i` of the population (counted over its environments in order, and
    within one environment over the devices in mesh order) gets
    `fold_in(key(seed), i)`: every agent on every device has its own key, and
    a seed gives the same population on any number of devices, so a sharded
    run can be checked against one device.

    Args:
      seed: the run seed.
      population_size: the number of agents.

    Returns:
      `[population_size]` typed keys.
    """
    root = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(population_size))
