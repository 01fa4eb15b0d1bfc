"""The meta-trainer: a population of agents, K inner updates, one meta-update."""

from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

import envs
from agents import make_network, make_optimizer, rollout
from metarl.config import TrainConfig
from metarl.guard import skip_nonfinite, skipped_updates
from metarl.meta_loss import policy_gradient_meta_loss
from metarl.metagrad import InnerProblem, InnerState, MetaGradConfig, from_optax, unroll
from metarl.objectives import objective_from_config
from metarl.sharding import agent_keys, make_layout


class AgentState(NamedTuple):
    """One agent of the population."""

    inner: InnerState
    age: chex.Array  # [] inner updates since the agent was (re)initialised


class MetaState(NamedTuple):
    """Everything the meta-trainer carries from one meta-step to the next."""

    meta_params: Any
    meta_opt_state: Any
    population: AgentState  # leaves [P, ...]
    step: chex.Array  # [] meta-steps taken
    skipped: chex.Array  # [] meta-updates skipped for non-finite meta-gradients


def _tree_where(condition, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)


def _all_finite(tree) -> chex.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Trainer:
    """Builds the environments, agents and objective of a config; runs meta-steps.

    `meta_step` is one compiled program: each agent of the population applies
    `meta.inner_steps` updates with the learned objective, the updated agents
    are scored by the meta-loss on fresh rollouts, the meta-gradient averaged
    over the population updates the objective by Adam, and agents that reached
    `meta.lifetime` updates start again from fresh parameters.

    The population is split over `devices` (by default every device of every
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
        self.layout = make_layout(meta.population_size, devices)
        self.dtype = jnp.float64 if config.dtype == "float64" else jnp.float32
        if self.dtype == jnp.float64 and not jax.config.jax_enable_x64:
            jax.config.update("jax_enable_x64", True)
        self.env = envs.make(
            config.env.name, agent.num_envs, config.env.max_episode_steps
        )
        self.objective = objective_from_config(config.objective)
        self.network = make_network(
            num_actions=self.env.num_actions,
            obs_shape=self.env.obs_shape,
            hidden_sizes=agent.hidden_sizes,
            torso=agent.torso,
            conv_features=agent.conv_features,
            activation=agent.activation,
            prediction_size=getattr(self.objective, "prediction_size", 0),
        )
        opt = agent.optimizer
        # A non-finite agent update is skipped and counted, never applied.
        self.optimizer = skip_nonfinite(
            make_optimizer(
                opt.name,
                opt.learning_rate,
                max_grad_norm=opt.max_grad_norm,
                eps=opt.eps,
                eps_root=opt.eps_root,
                momentum=opt.momentum,
                weight_decay=opt.weight_decay,
            )
        )
        self.problem = InnerProblem(
            rollout=self._rollout,
            loss=lambda params, meta_params, trajectory: self.objective.loss(
                self.network, params, meta_params, trajectory
            ),
            update=from_optax(self.optimizer),
        )
        self.grad_config = MetaGradConfig(
            mode=meta.grad,
            checkpoint_every=meta.checkpoint_every,
            store_rollout=meta.store_rollout,
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

    def _rollout(self, params, env_carry, key):
        return rollout(
            self.network,
            params,
            self.env,
            env_carry,
            key,
            self.config.agent.unroll_length,
        )

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
        inner = jax.vmap(self.init_agent)(keys)
        ages = (
            jnp.arange(meta.population_size) * meta.lifetime
        ) // meta.population_size
        meta_params = self.objective.init(self.dtype)
        return MetaState(
            meta_params=meta_params,
            meta_opt_state=self.meta_optimizer.init(meta_params),
            population=AgentState(inner=inner, age=ages.astype(jnp.int32)),
            step=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    def _agent_meta_loss(self, meta_params, inner: InnerState):
        """K inner updates of one agent, then the meta-loss of the result."""
        meta = self.config.meta

        # Inner updates with the learned objective.
        inner, (metrics, stats) = unroll(
            self.problem, meta_params, inner, meta.inner_steps, self.grad_config
        )

        # Meta-loss of the updated agent on a fresh rollout.
        key, rollout_key = jax.random.split(inner.key)
        trajectory, env_carry, meta_stats = self._rollout(
            inner.params, inner.env, rollout_key
        )
        meta_loss = policy_gradient_meta_loss(
            self.network, inner.params, trajectory, meta.discount, meta.lambda_
        )
        # Objectives with learned targets regularise them in the meta-loss.
        regularizer = getattr(self.objective, "meta_regularizer", None)
        if regularizer is not None:
            meta_loss = meta_loss + regularizer(
                self.network, inner.params, meta_params, trajectory
            )
        inner = inner._replace(env=env_carry, key=key)
        stats = jax.tree.map(lambda s, m: s.sum() + m, stats, meta_stats)
        metrics = jax.tree.map(jnp.mean, metrics)
        return meta_loss, (inner, metrics, stats)

    def _population_meta_loss(self, meta_params, population: AgentState):
        losses, aux = jax.vmap(self._agent_meta_loss, in_axes=(None, 0))(
            meta_params, population.inner
        )
        return losses.mean(), aux

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

    def _reset_expired(self, population: AgentState) -> tuple[AgentState, chex.Array]:
        """Re-initialises the parameters and optimiser of agents past their lifetime."""
        meta = self.config.meta
        age = population.age + meta.inner_steps
        expired = age >= meta.lifetime

        def reset_one(inner: InnerState, expired):
            key, params_key = jax.random.split(inner.key)
            params = self.network.init(params_key, self.dtype)
            fresh = inner._replace(params=params, opt_state=self.optimizer.init(params))
            return _tree_where(expired, fresh, inner._replace(key=key))

        inner = jax.vmap(reset_one)(population.inner, expired)
        age = jnp.where(expired, 0, age)
        return AgentState(inner=inner, age=age), expired.sum()

    def _meta_step(self, state: MetaState) -> tuple[MetaState, dict[str, chex.Array]]:
        # Meta-gradient of the population's mean meta-loss.
        (meta_loss, (inner, metrics, stats)), meta_grads = jax.value_and_grad(
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
        population, resets = self._reset_expired(
            AgentState(inner=inner, age=state.population.age)
        )

        new_state = MetaState(
            meta_params=meta_params,
            meta_opt_state=meta_opt_state,
            population=population,
            step=state.step + 1,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        out = {
            "meta/loss": meta_loss,
            "meta/grad_norm": optax.global_norm(meta_grads),
            "meta/skipped": (~finite).astype(jnp.int32),
            "agent/resets": resets,
            "agent/skipped_updates": (
                skipped_updates(inner.opt_state)
                - skipped_updates(state.population.inner.opt_state)
            ).sum(),
            "episode/return_sum": stats.return_sum.sum(),
            "episode/length_sum": stats.length_sum.sum(),
            "episode/count": stats.episodes.sum(),
            **{k: v.mean() for k, v in metrics.items()},
        }
        return new_state, out
