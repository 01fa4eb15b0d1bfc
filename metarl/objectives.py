"""Learned objectives: losses for agents whose free parameters are meta-learned."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp

from agents import LossHyperparams, Trajectory, actor_critic_loss
from metarl.learned_targets import LearnedTargetsObjective


# Host-side maths keeps `init` traceable, so the trainer can build its state
# inside `jax.jit` directly on the devices it belongs on.
def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@dataclasses.dataclass(frozen=True)
class ParametricObjective:
    """The actor-critic loss with its discount, lambda and weights learned.

    The meta-parameters are unconstrained: `discount = sigmoid(discount_logit)`,
    `lambda_ = sigmoid(lambda_logit)`, `entropy_coef = exp(log_entropy_coef)`
    and `value_coef = exp(log_value_coef)`; the policy-gradient term keeps
    weight one, since an overall scale is absorbed by adaptive optimisers.

    Attributes:
      init_discount: the discount the objective starts from.
      init_lambda: the trace parameter it starts from.
      init_entropy_coef: the entropy weight it starts from.
      init_value_coef: the value-loss weight it starts from.
    """

    init_discount: float = 0.99
    init_lambda: float = 0.95
    init_entropy_coef: float = 0.01
    init_value_coef: float = 0.5

    name = "parametric"
    input_features = ("reward", "terminated", "truncated", "value", "next_value")

    def init(self, dtype=jnp.float32) -> dict[str, chex.Array]:
        """The starting meta-parameters."""
        values = {
            "discount_logit": _logit(self.init_discount),
            "lambda_logit": _logit(self.init_lambda),
            "log_entropy_coef": math.log(self.init_entropy_coef),
            "log_value_coef": math.log(self.init_value_coef),
        }
        return {k: jnp.asarray(v, dtype) for k, v in values.items()}

    def hyperparams(self, meta_params: dict[str, chex.Array]) -> LossHyperparams:
        """The loss's scalars for these meta-parameters."""
        one = jnp.ones_like(meta_params["discount_logit"])
        return LossHyperparams(
            discount=jax.nn.sigmoid(meta_params["discount_logit"]),
            lambda_=jax.nn.sigmoid(meta_params["lambda_logit"]),
            entropy_coef=jnp.exp(meta_params["log_entropy_coef"]),
            value_coef=jnp.exp(meta_params["log_value_coef"]),
            policy_coef=one,
        )

    def loss(self, network, params, meta_params, trajectory: Trajectory):
        """The agent's loss on a `[T, B]` trajectory: `(loss, metrics)`."""
        return actor_critic_loss(
            network, params, trajectory, self.hyperparams(meta_params)
        )

    def describe(self, meta_params) -> dict[str, float]:
        """The objective's current scalars by name, for logs."""
        hyper = self.hyperparams(meta_params)
        return {
            "discount": float(hyper.discount),
            "lambda": float(hyper.lambda_),
            "entropy_coef": float(hyper.entropy_coef),
            "value_coef": float(hyper.value_coef),
        }

    def spec(self) -> dict:
        """The hyperparameters that rebuild this objective."""
        return dataclasses.asdict(self)


OBJECTIVES = {
    "parametric": ParametricObjective,
    "learned_targets": LearnedTargetsObjective,
}


def make_objective(name: str, **kwargs):
    """Builds the objective called `name` from its hyperparameters.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in OBJECTIVES:
        raise ValueError(
            f"unknown objective '{name}'; choose one of: {', '.join(OBJECTIVES)}"
        )
    return OBJECTIVES[name](**kwargs)


def objective_from_config(config) -> object:
    """Builds the objective a config's `objective` group describes.

    Args:
      config: an `ObjectiveConfig`; only the settings the named objective
        takes are passed on.

    Returns:
      The objective.

    Raises:
      ValueError: for an unknown name.
    """
    name = config.name
    if name not in OBJECTIVES:
        return make_objective(name)
    taken = {field.name for field in dataclasses.fields(OBJECTIVES[name])}
    settings = dataclasses.asdict(config)
    return make_objective(name, **{k: v for k, v in settings.items() if k in taken})
