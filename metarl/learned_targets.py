"""A learned objective whose network produces the agent's targets.

After Oh et al. (2020), "Discovering Reinforcement Learning Algorithms"
(Learned Policy Gradient): the agent has a policy and a prediction vector
`y(s)` whose meaning nobody prescribes. A small recurrent network, the
meta-parameters, reads a trajectory backwards in time and outputs, at every
step, a scalar policy target `pi_hat_t` and a target distribution `y_hat_t`
for the prediction. The agent ascends `pi_hat_t * log pi(a_t | s_t)` and
descends `KL(y_hat_t || y(s_t))`, so the meta-network decides both what the
agent predicts and how those predictions feed back into its policy.

All features the meta-network reads come from the rollout (the behaviour
policy's probabilities and predictions), so the targets are constants for the
agent's parameters and differentiable in the meta-parameters: the inner loss
is a scalar function of both, as MixFlow-MG needs.
"""

import dataclasses

import chex
import distrax
import jax
import jax.numpy as jnp

from agents import Trajectory
from agents.loss import lambda_returns

# The per-step features, in the order the meta-network reads them.
INPUT_FEATURES = (
    "reward",
    "terminated",
    "action_prob",
    "prediction_t",
    "prediction_tp1",
)


@dataclasses.dataclass(frozen=True)
class LearnedTargetsObjective:
    """Policy and prediction targets from a backward recurrent meta-network.

    The meta-network embeds the softmax of the prediction vectors at `t` and
    `t+1` with one shared tanh layer, concatenates reward, termination and
    the probability of the action taken, and runs a GRU from the end of the
    trajectory to its start; the recurrent state is cleared where an episode
    ended, so targets never mix episodes. Linear heads give `pi_hat_t` and
    the logits of `y_hat_t`.

    The regularisers of Oh et al. (2020) belong to the meta-loss (see
    `meta_regularizer`): entropy bonuses for the updated agent's policy and
    prediction, and L2 penalties on both targets, which keep the targets from
    growing without bound while the meta-network learns.

    A value head is also regressed on fixed-discount lambda-returns with
    weight `value_coef`: the meta-loss uses it as its baseline; the
    meta-network never reads it.

    Attributes:
      prediction_size: `M`, the size of the agent's prediction vector.
      embed_size: width of the shared embedding of the prediction vectors.
      hidden_size: width of the GRU.
      prediction_coef: weight of the prediction's KL term in the agent loss.
      value_coef: weight of the baseline value regression (0: none).
      value_discount: discount of the value regression's returns.
      value_lambda: trace parameter of those returns.
      policy_entropy_reg: meta-loss bonus for the updated policy's entropy.
      prediction_entropy_reg: meta-loss bonus for the prediction's entropy.
      policy_target_reg: meta-loss L2 penalty on `pi_hat`.
      prediction_target_reg: meta-loss L2 penalty on the logits of `y_hat`.
      seed: seeds the meta-network's initial weights.
    """

    prediction_size: int = 8
    embed_size: int = 8
    hidden_size: int = 16
    prediction_coef: float = 1.0
    value_coef: float = 0.5
    value_discount: float = 0.99
    value_lambda: float = 0.95
    policy_entropy_reg: float = 0.01
    prediction_entropy_reg: float = 0.001
    policy_target_reg: float = 0.001
    prediction_target_reg: float = 0.001
    seed: int = 0

    name = "learned_targets"
    input_features = INPUT_FEATURES

    def init(self, dtype=jnp.float32) -> dict[str, chex.Array]:
        """The starting meta-parameters: the meta-network's weights."""
        m, e, h = self.prediction_size, self.embed_size, self.hidden_size
        num_inputs = 3 + 2 * e
        keys = jax.random.split(jax.random.key(self.seed), 5)

        def glorot(key, shape):
            scale = jnp.sqrt(2.0 / (shape[0] + shape[1]))
            return scale * jax.random.normal(key, shape, jnp.float32)

        params = {
            "embed_w": glorot(keys[0], (m, e)),
            "embed_b": jnp.zeros((e,)),
            "gru_wx": glorot(keys[1], (num_inputs, 3 * h)),
            "gru_wh": glorot(keys[2], (h, 3 * h)),
            "gru_b": jnp.zeros((3 * h,)),
            # Small output weights: fresh targets are near zero, so early
            # meta-gradients, not the random initialisation, shape the rule.
            "policy_w": 0.1 * glorot(keys[3], (h, 1)),
            "policy_b": jnp.zeros((1,)),
            "prediction_w": 0.1 * glorot(keys[4], (h, m)),
            "prediction_b": jnp.zeros((m,)),
        }
        return {k: v.astype(dtype) for k, v in params.items()}

    def targets(self, meta_params, trajectory: Trajectory):
        """The targets for one environment's trajectory, `[T]` leaves.

        Args:
          meta_params: the meta-network's weights.
          trajectory: a `[T]` trajectory with `log_probs`, `predictions` and
            `next_predictions`.

        Returns:
          `(pi_hat [T], y_hat_logits [T, M])`.
        """
        dtype = meta_params["gru_b"].dtype
        h = self.hidden_size

        # Per-step features; predictions enter as distributions.
        def embed(prediction):
            y = jax.nn.softmax(prediction.astype(dtype), axis=-1)
            return jnp.tanh(y @ meta_params["embed_w"] + meta_params["embed_b"])

        features = jnp.concatenate(
            [
                trajectory.rewards.astype(dtype)[:, None],
                trajectory.terminated.astype(dtype)[:, None],
                jnp.exp(trajectory.log_probs.astype(dtype))[:, None],
                embed(trajectory.predictions),
                embed(trajectory.next_predictions),
            ],
            axis=-1,
        )  # [T, 3 + 2E]
        done = jnp.logical_or(trajectory.terminated, trajectory.truncated)
        keep = 1.0 - done.astype(dtype)

        # A GRU run backwards in time, reset where an episode ended.
        def gru(state_tp1, inputs):
            x_t, keep_t = inputs
            state = state_tp1 * keep_t
            gx = x_t @ meta_params["gru_wx"] + meta_params["gru_b"]
            gh = state @ meta_params["gru_wh"]
            reset = jax.nn.sigmoid(gx[:h] + gh[:h])
            update = jax.nn.sigmoid(gx[h : 2 * h] + gh[h : 2 * h])
            candidate = jnp.tanh(gx[2 * h :] + reset * gh[2 * h :])
            state_t = update * state + (1.0 - update) * candidate
            return state_t, state_t

        _, states = jax.lax.scan(
            gru, jnp.zeros((h,), dtype), (features, keep), reverse=True
        )  # [T, H]

        # Linear heads for the two targets.
        pi_hat = (states @ meta_params["policy_w"] + meta_params["policy_b"])[:, 0]
        y_hat_logits = (
            states @ meta_params["prediction_w"] + meta_params["prediction_b"]
        )
        return pi_hat, y_hat_logits

    def _batch_targets(self, meta_params, trajectory: Trajectory):
        return jax.vmap(self.targets, in_axes=(None, 1), out_axes=1)(
            meta_params, trajectory
        )

    def loss(self, network, params, meta_params, trajectory: Trajectory):
        """The agent's loss on a `[T, B]` trajectory: `(loss, metrics)`.

        Args:
          network: a `Network` with a prediction head (`apply_predictions`).
          params: the agent's parameters.
          meta_params: the meta-network's weights.
          trajectory: a `[T, B]` rollout with the prediction fields.

        Returns:
          `(loss, metrics)` with flat metric names.

        Raises:
          ValueError: if the trajectory lacks the prediction fields.
        """
        _check_trajectory(trajectory)
        logits, values, predictions = network.apply_predictions(
            params, trajectory.obs
        )  # [T, B, A], [T, B], [T, B, M]
        pi_hat, y_hat_logits = self._batch_targets(meta_params, trajectory)

        # Policy: ascend the learned target's weighting of log pi(a | s).
        log_prob = distrax.Categorical(logits=logits).log_prob(trajectory.actions)
        policy_loss = -jnp.mean(pi_hat * log_prob)

        # Prediction: move y(s) towards the target distribution.
        y_hat = jax.nn.softmax(y_hat_logits, axis=-1)
        log_y = jax.nn.log_softmax(predictions, axis=-1)
        log_y_hat = jax.nn.log_softmax(y_hat_logits, axis=-1)
        prediction_loss = jnp.mean(jnp.sum(y_hat * (log_y_hat - log_y), axis=-1))

        # The meta-loss's baseline: values on fixed-discount returns.
        dtype = logits.dtype
        returns = jax.vmap(lambda_returns, in_axes=(1, None, None), out_axes=1)(
            trajectory,
            jnp.asarray(self.value_discount, dtype),
            jnp.asarray(self.value_lambda, dtype),
        )
        value_loss = 0.5 * jnp.mean(jnp.square(returns - values))

        loss = (
            policy_loss
            + self.prediction_coef * prediction_loss
            + self.value_coef * value_loss
        )
        metrics = {
            "loss/total": loss,
            "loss/policy": policy_loss,
            "loss/prediction": prediction_loss,
            "loss/value": value_loss,
            "targets/policy_mean": jnp.mean(pi_hat),
            "targets/policy_std": jnp.std(pi_hat),
        }
        return loss, metrics

    def meta_regularizer(
        self, network, params, meta_params, trajectory: Trajectory
    ) -> chex.Array:
        """The regularisers of Oh et al. (2020), added to the meta-loss.

        `-policy_entropy_reg * H(pi) - prediction_entropy_reg * H(y)
        + policy_target_reg * mean(pi_hat^2)
        + prediction_target_reg * mean(|y_hat logits|^2)`, on the updated
        agent's fresh rollout.

        Args:
          network: the agent's network (with a prediction head).
          params: the updated agent's parameters.
          meta_params: the meta-network's weights.
          trajectory: a fresh `[T, B]` rollout of the updated agent.

        Returns:
          A scalar to add to the meta-loss.
        """
        _check_trajectory(trajectory)
        logits, _, predictions = network.apply_predictions(params, trajectory.obs)
        policy_entropy = jnp.mean(distrax.Categorical(logits=logits).entropy())
        prediction_entropy = jnp.mean(distrax.Categorical(logits=predictions).entropy())
        pi_hat, y_hat_logits = self._batch_targets(meta_params, trajectory)
        return (
            -self.policy_entropy_reg * policy_entropy
            - self.prediction_entropy_reg * prediction_entropy
            + self.policy_target_reg * jnp.mean(jnp.square(pi_hat))
            + self.prediction_target_reg
            * jnp.mean(jnp.sum(jnp.square(y_hat_logits), axis=-1))
        )

    def describe(self, meta_params) -> dict[str, float]:
        """The output heads' sizes, for logs: the norms of their weights."""
        return {
            "policy_head_norm": float(jnp.linalg.norm(meta_params["policy_w"])),
            "policy_bias": float(meta_params["policy_b"][0]),
            "prediction_head_norm": float(jnp.linalg.norm(meta_params["prediction_w"])),
        }

    def spec(self) -> dict:
        """The hyperparameters that rebuild this objective."""
        return dataclasses.asdict(self)


def _check_trajectory(trajectory: Trajectory) -> None:
    missing = [
        name
        for name in ("log_probs", "predictions", "next_predictions")
        if getattr(trajectory, name) is None
    ]
    if missing:
        raise ValueError(
            f"the learned_targets objective needs trajectory fields {missing}: "
            "roll out a network with a prediction head, or pass them to "
            "metarl.make_trajectory"
        )
