"""The meta-trainer: a population of agents, K inner updates, one meta-update.

The population may span several environments, learning rates and lifetimes
(`metarl.config.population_plan`). The agents of one environment share a
network shape and are vmapped together as an `AgentGroup`; the groups of a
population are laid side by side in one compiled meta-step, and the learned
objective, which sees only environment-agnostic quantities, is shared by all.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import envs
from agents import make_network, make_optimizer, record, replay, rollout
from agents.networks import Network
from metarl.config import TrainConfig, population_plan
from metarl.guard import skip_nonfinite, skipped_updates
from metarl.meta_loss import policy_gradient_meta_loss
from metarl.metagrad import InnerProblem, InnerState, MetaGradConfig, unroll
from metarl.objectives import objective_from_config
from metarl.sharding import agent_keys, make_layout


class AgentMeta(NamedTuple):
    """What one agent's inner updates read besides its own state.

    Attributes:
      objective: the learned objective's parameters, shared by every agent;
        the meta-gradient is taken with respect to them.
      learning_rate: `[]` the agent's own step size.
    """

    objective: Any
    learning_rate: chex.Array


class AgentState(NamedTuple):
    """One agent of the population."""

    inner: InnerState
    age: chex.Array  # [] inner updates since the agent was (re)initialised


class MetaState(NamedTuple):
    """Everything the meta-trainer carries from one meta-step to the next."""

    meta_params: Any
    meta_opt_state: Any
    # One `AgentState` per environment, in `env.name` order; leaves [P_env, ...].
    population: tuple[AgentState, ...]
    step: chex.Array  # [] meta-steps taken
    skipped: chex.Array  # [] meta-updates skipped for non-finite meta-gradients


def _tree_where(condition, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)


def _all_finite(tree) -> chex.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _stats_sums(stats) -> dict[str, chex.Array]:
    return {
        "return_sum": stats.return_sum.sum(),
        "length_sum": stats.length_sum.sum(),
        "count": stats.episodes.sum(),
    }


def inner_problem(
    objective, network: Network, env, optimizer, unroll_length: int
) -> InnerProblem:
    """The inner learner of one agent, for `metarl.metagrad.unroll`.

    Args:
      objective: the loss, an objective of `metarl.objectives`.
      network: the agent's network.
      env: the agent's batch of environments.
      optimizer: an optax optimiser at unit step size.
      unroll_length: environment steps per inner update.

    Returns:
      An `InnerProblem` whose meta-parameters are an `AgentMeta`: the
      objective's parameters, and the learning rate that scales the updates.
    """

    def agent_rollout(params, env_carry, key):
        return rollout(network, params, env, env_carry, key, unroll_length)

    def loss(params, meta: AgentMeta, trajectory):
        return objective.loss(network, params, meta.objective, trajectory)

    def update(grads, opt_state, params, meta: AgentMeta):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        rate = meta.learning_rate
        return jax.tree.map(lambda u: u * rate.astype(u.dtype), updates), opt_state

    def agent_replay(kept, env_carry, key):
        return replay(env, env_carry, key, kept)

    return InnerProblem(
        rollout=agent_rollout,
        loss=loss,
        update=update,
        record=record,
        replay=agent_replay,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class AgentGroup:
    """The agents of the population that learn on one environment.

    Attributes:
      env_name: the environment's id.
      env: the agents' batch of environments.
      network: the agents' actor-critic network.
      optimizer: the agents' optimiser, at unit step size; each agent's
        learning rate scales its updates.
      problem: the inner learner for `metarl.metagrad.unroll`; its
        meta-parameters are an `AgentMeta`.
      learning_rates: each agent's learning rate.
      lifetimes: each agent's lifetime, in inner updates.
      offset: the index of the group's first agent in the whole population,
        which its agents' random keys derive from.
    """

    env_name: str
    env: Any
    network: Network
    optimizer: optax.GradientTransformation
    problem: InnerProblem
    learning_rates: tuple[float, ...]
    lifetimes: tuple[int, ...]
    offset: int
    dtype: Any

    @property
    def size(self) -> int:
        """The number of agents in the group."""
        return len(self.learning_rates)

    def init_agent(self, key: chex.PRNGKey) -> InnerState:
        """A fresh agent: parameters, optimiser state, environments and key."""
        params_key, env_key, agent_key = jax.random.split(key, 3)
        params = self.network.init(params_key, self.dtype)
        return InnerState(
            params=params,
            opt_state=self.optimizer.init(params),
            env=self.env.reset(env_key),
            key=agent_key,
        )

    def agent_meta(self, meta_params) -> AgentMeta:
        """The group's `AgentMeta`, batched over its agents (objective shared)."""
        return AgentMeta(
            objective=meta_params,
            learning_rate=jnp.asarray(self.learning_rates, self.dtype),
        )

    def agent_meta_axes(self) -> AgentMeta:
        """`vmap` axes of `agent_meta`'s result: shared objective, own rates."""
        return AgentMeta(objective=None, learning_rate=0)


class Trainer:
    """Builds the environments, agents and objective of a config; runs meta-steps.

    `meta_step` is one compiled program: each agent of the population applies
    `meta.inner_steps` updates with the learned objective, the updated agents
    are scored by the meta-loss on fresh rollouts, the meta-gradient averaged
    over the population updates the objective by Adam, and agents that reached
    their lifetime start again from fresh parameters.

    `groups` holds one `AgentGroup` per environment of `env.name`. Each
    group's agents are split over `devices` (by default every device of every
    process) and the rest of the state is replicated; the mean over the
    population is then an average across devices (see `metarl.sharding`).

    Args:
      config: the validated configuration.
      devices: the devices to lay the population over; all if None.

    Raises:
      ConfigError: if the population does not split evenly over the devices.
    """

    def __init__(
        self, config: TrainConfig, devices: Sequence[jax.Device] | None = None
    ):
        self.config = config
        agent, meta = config.agent, config.meta
        plan = population_plan(config)
        self.layout = make_layout(meta.population_size, devices, groups=len(plan))
        self.dtype = jnp.float64 if config.dtype == "float64" else jnp.float32
        if self.dtype == jnp.float64 and not jax.config.jax_enable_x64:
            jax.config.update("jax_enable_x64", True)
        self.objective = objective_from_config(config.objective)
        opt = agent.optimizer
        # Every agent's learning rate scales a unit-step update (see
        # `AgentMeta`); a non-finite update is skipped and counted, never applied.
        self.optimizer = skip_nonfinite(
            make_optimizer(
                opt.name,
                1.0,
                max_grad_norm=opt.max_grad_norm,
                eps=opt.eps,
                eps_root=opt.eps_root,
                momentum=opt.momentum,
                weight_decay=opt.weight_decay,
            )
        )
        self.groups = []
        for name, learning_rates, lifetimes in plan:
            self.groups.append(
                self._make_group(
                    name,
                    learning_rates,
                    lifetimes,
                    offset=sum(g.size for g in self.groups),
                )
            )
        self.env_names = tuple(g.env_name for g in self.groups)
        self.grad_config = MetaGradConfig(
            mode=meta.grad,
            checkpoint_every=meta.checkpoint_every,
            store_rollout=meta.store_rollout,
            replay_rollout=meta.replay_rollout,
            store_inner_grad=meta.store_inner_grad,
        )
        meta_parts = [optax.adam(meta.learning_rate)]
        if meta.max_grad_norm is not None:
            meta_parts.insert(0, optax.clip_by_global_norm(meta.max_grad_norm))
        self.meta_optimizer = optax.chain(*meta_parts)
        self.env_steps_per_meta_step = (
            meta.population_size
            * agent.num_envs
            * agent.unroll_length
            * (meta.inner_steps + 1)
        )
        shardings = self.layout.state_shardings(jax.eval_shape(self._init, 0))
        self._jit_init = jax.jit(self._init, out_shardings=shardings)
        self.meta_step = jax.jit(
            self._meta_step,
            donate_argnums=0,
            in_shardings=(shardings,),
            out_shardings=(shardings, self.layout.replicated),
        )

    def _make_group(self, name, learning_rates, lifetimes, offset) -> AgentGroup:
        agent = self.config.agent
        env = envs.make(name, agent.num_envs, self.config.env.max_episode_steps)
        network = make_network(
            num_actions=env.num_actions,
            obs_shape=env.obs_shape,
            hidden_sizes=agent.hidden_sizes,
            torso=agent.torso,
            conv_features=agent.conv_features,
            activation=agent.activation,
            prediction_size=getattr(self.objective, "prediction_size", 0),
        )
        return AgentGroup(
            env_name=name,
            env=env,
            network=network,
            optimizer=self.optimizer,
            problem=inner_problem(
                self.objective, network, env, self.optimizer, agent.unroll_length
            ),
            learning_rates=tuple(learning_rates),
            lifetimes=tuple(lifetimes),
            offset=offset,
            dtype=self.dtype,
        )

    def init(self, seed: int) -> MetaState:
        """The state before the first meta-step, laid out over the devices.

        Agents' ages are staggered evenly over a lifetime so that, once every
        agent has been re-initialised once, the objective is trained on agents
        at every stage of learning at the same time.

        Args:
          seed: the run seed; each agent's key derives from it and the agent's
            place on the device mesh.

        Returns:
          The `MetaState`, its population split over the devices.
        """
        return self._jit_init(seed)

    def _init(self, seed) -> MetaState:
        meta = self.config.meta
        keys = agent_keys(seed, meta.population_size)
        population = []
        for group in self.groups:
            inner = jax.vmap(group.init_agent)(
                keys[group.offset : group.offset + group.size]
            )
            slots = np.arange(group.size)
            ages = slots * np.asarray(group.lifetimes) // group.size
            population.append(AgentState(inner=inner, age=jnp.asarray(ages, jnp.int32)))
        meta_params = self.objective.init(self.dtype)
        return MetaState(
            meta_params=meta_params,
            meta_opt_state=self.meta_optimizer.init(meta_params),
            population=tuple(population),
            step=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    def agent_meta_loss(self, group: AgentGroup, meta: AgentMeta, inner: InnerState):
        """K inner updates of one agent, then the meta-loss of the result.

        Args:
          group: the agent's group.
          meta: the objective's parameters and the agent's learning rate.
          inner: the agent's state.

        Returns:
          `(meta_loss, (inner, metrics, stats))`: the agent's state after the
          updates and the meta-loss rollout, the mean loss metrics and the
          episode tallies of all its rollouts.
        """
        meta_cfg = self.config.meta

        # Inner updates with the learned objective.
        inner, (metrics, stats) = unroll(
            group.problem, meta, inner, meta_cfg.inner_steps, self.grad_config
        )

        # Meta-loss of the updated agent on a fresh rollout.
        key, rollout_key = jax.random.split(inner.key)
        trajectory, env_carry, meta_stats = group.problem.rollout(
            inner.params, inner.env, rollout_key
        )
        meta_loss = policy_gradient_meta_loss(
            group.network, inner.params, trajectory, meta_cfg.discount, meta_cfg.lambda_
        )
        # Objectives with learned targets regularise them in the meta-loss.
        regularizer = getattr(self.objective, "meta_regularizer", None)
        if regularizer is not None:
            meta_loss = meta_loss + regularizer(
                group.network, inner.params, meta.objective, trajectory
            )
        inner = inner._replace(env=env_carry, key=key)
        stats = jax.tree.map(lambda s, m: s.sum() + m, stats, meta_stats)
        metrics = jax.tree.map(jnp.mean, metrics)
        return meta_loss, (inner, metrics, stats)

    def _population_meta_loss(self, meta_params, population):
        losses, inners, metrics, stats = [], [], [], []
        for group, agents in zip(self.groups, population, strict=True):
            loss, (inner, metric, stat) = jax.vmap(
                lambda m, i, g=group: self.agent_meta_loss(g, m, i),
                in_axes=(group.agent_meta_axes(), 0),
            )(group.agent_meta(meta_params), agents.inner)
            losses.append(loss)
            inners.append(inner)
            metrics.append(metric)
            stats.append(stat)
        # Every agent counts the same, whichever environment it learns in.
        meta_loss = jnp.concatenate(losses).mean()
        metrics = jax.tree.map(lambda *m: jnp.concatenate(m), *metrics)
        return meta_loss, (tuple(inners), metrics, stats)

    def meta_gradient(self, state: MetaState):
        """The population's mean meta-loss and its meta-gradient at `state`.

        The same computation as in `meta_step`, without the update; for
        checking meta-gradients.

        Returns:
          `(meta_loss, meta_grads)`.
        """
        (meta_loss, _), meta_grads = jax.value_and_grad(
            self._population_meta_loss, has_aux=True
        )(state.meta_params, state.population)
        return meta_loss, meta_grads

    def _reset_expired(
        self, group: AgentGroup, agents: AgentState
    ) -> tuple[AgentState, chex.Array]:
        """Re-initialises the parameters and optimiser of agents past their lifetime."""
        age = agents.age + self.config.meta.inner_steps
        expired = age >= jnp.asarray(group.lifetimes, age.dtype)

        def reset_one(inner: InnerState, expired):
            key, params_key = jax.random.split(inner.key)
            params = group.network.init(params_key, self.dtype)
            fresh = inner._replace(
                params=params, opt_state=group.optimizer.init(params)
            )
            return _tree_where(expired, fresh, inner._replace(key=key))

        inner = jax.vmap(reset_one)(agents.inner, expired)
        age = jnp.where(expired, 0, age)
        return AgentState(inner=inner, age=age), expired.sum()

    def _meta_step(self, state: MetaState) -> tuple[MetaState, dict[str, chex.Array]]:
        # Meta-gradient of the population's mean meta-loss.
        (meta_loss, (inners, metrics, stats)), meta_grads = jax.value_and_grad(
            self._population_meta_loss, has_aux=True
        )(state.meta_params, state.population)

        # Meta-update by Adam, skipped if the meta-gradient is not finite.
        updates, meta_opt_state = self.meta_optimizer.update(
            meta_grads, state.meta_opt_state, state.meta_params
        )
        finite = _all_finite(meta_grads) & jnp.isfinite(meta_loss)
        meta_params = _tree_where(
            finite, optax.apply_updates(state.meta_params, updates), state.meta_params
        )
        meta_opt_state = _tree_where(finite, meta_opt_state, state.meta_opt_state)

        # Agents past their lifetime start again.
        population, resets, skipped = [], 0, 0
        for group, before, inner in zip(
            self.groups, state.population, inners, strict=True
        ):
            agents, expired = self._reset_expired(
                group, AgentState(inner=inner, age=before.age)
            )
            population.append(agents)
            resets = resets + expired
            skipped = (
                skipped
                + (
                    skipped_updates(inner.opt_state)
                    - skipped_updates(before.inner.opt_state)
                ).sum()
            )

        new_state = MetaState(
            meta_params=meta_params,
            meta_opt_state=meta_opt_state,
            population=tuple(population),
            step=state.step + 1,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        sums = [_stats_sums(s) for s in stats]
        out = {
            "meta/loss": meta_loss,
            "meta/grad_norm": optax.tree.norm(meta_grads),
            "meta/skipped": (~finite).astype(jnp.int32),
            "agent/resets": resets,
            "agent/skipped_updates": skipped,
            **{
                f"episode/{key}": sum(s[key] for s in sums)
                for key in ("return_sum", "length_sum", "count")
            },
            **{k: v.mean() for k, v in metrics.items()},
        }
        # Returns of different games are on different scales: each one's too.
        if len(self.groups) > 1:
            for group, group_sums in zip(self.groups, sums, strict=True):
                for key, value in group_sums.items():
                    out[f"episode/{group.env_name}/{key}"] = value
        return new_state, out
