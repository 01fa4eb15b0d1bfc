"""Actor-critic networks for grid (MinAtar) and vector observations."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu}


class ActorCritic(nn.Module):
    """A shared torso with a policy head and a value head.

    With `torso="conv"` the torso starts with a 3x3 convolution over the
    `H x W x C` grid (as MinAtar agents do); with `torso="mlp"` observations are
    flattened. The torso is shared so that the value loss shapes the features
    the policy reads: with separate networks the value-loss weight could not
    change the policy, and would get no meta-gradient. Smooth activations
    (`tanh`) keep the second derivatives that meta-gradients use informative.

    Attributes:
      num_actions: size of the discrete action set.
      hidden_sizes: widths of the dense layers of each network.
      torso: "mlp" or "conv".
      conv_features: filters of the convolution when `torso="conv"`.
      activation: "tanh" or "relu".
      prediction_size: size of an extra prediction-vector head whose meaning
        a learned objective decides (Oh et al., 2020, "Discovering
        Reinforcement Learning Algorithms"); 0 for none.
    """

    num_actions: int
    hidden_sizes: Sequence[int] = (64, 64)
    torso: str = "mlp"
    conv_features: int = 16
    activation: str = "tanh"
    prediction_size: int = 0

    def _encode(self, obs: jnp.ndarray, obs_ndim: int) -> jnp.ndarray:
        batch_shape = obs.shape[: obs.ndim - obs_ndim]
        if self.torso == "conv":
            x = obs.reshape((-1, *obs.shape[-obs_ndim:]))
            x = nn.relu(nn.Conv(self.conv_features, (3, 3))(x))
            return x.reshape((*batch_shape, -1))
        return obs.reshape((*batch_shape, -1))

    def _mlp(self, x: jnp.ndarray) -> jnp.ndarray:
        act = _ACTIVATIONS[self.activation]
        for width in self.hidden_sizes:
            x = act(nn.Dense(width)(x))
        return x

    @nn.compact
    def __call__(self, obs: jnp.ndarray, obs_ndim: int = 1):
        """Returns `(logits [..., A], value [...])` for observations `[..., *obs]`.

        With a prediction head, returns `(logits, value, prediction [..., M])`.
        """
        hidden = self._mlp(self._encode(obs, obs_ndim))
        logits = nn.Dense(
            self.num_actions, kernel_init=nn.initializers.orthogonal(0.01)
        )(hidden)
        value = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0))(hidden)
        if not self.prediction_size:
            return logits, jnp.squeeze(value, -1)
        prediction = nn.Dense(
            self.prediction_size, kernel_init=nn.initializers.orthogonal(0.01)
        )(hidden)
        return logits, jnp.squeeze(value, -1), prediction


def make_network(
    num_actions: int,
    obs_shape: Sequence[int],
    hidden_sizes: Sequence[int] = (64, 64),
    torso: str = "mlp",
    conv_features: int = 16,
    activation: str = "tanh",
    prediction_size: int = 0,
) -> "Network":
    """Builds an actor-critic network for observations of shape `obs_shape`.

    Args:
      num_actions: size of the discrete action set.
      obs_shape: shape of one observation.
      hidden_sizes: widths of the dense layers.
      torso: "mlp" (flattened observations) or "conv" (needs `H x W x C`).
      conv_features: filters of the convolution.
      activation: "tanh" or "relu".
      prediction_size: size of the prediction-vector head (0: none).

    Returns:
      A `Network` with `init(key)`, `apply(params, obs)` and, with a
      prediction head, `apply_predictions(params, obs)`.

    Raises:
      ValueError: for an unknown torso or activation, or a conv torso on
        observations that are not `H x W x C` grids.
    """
    if torso not in ("mlp", "conv"):
        raise ValueError(f"agent.torso must be 'mlp' or 'conv', got '{torso}'")
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"agent.activation must be one of {sorted(_ACTIVATIONS)}, got "
            f"'{activation}'"
        )
    if torso == "conv" and len(obs_shape) != 3:
        raise ValueError(
            f"agent.torso=conv needs H x W x C observations, got shape "
            f"{tuple(obs_shape)}; use agent.torso=mlp"
        )
    module = ActorCritic(
        num_actions=num_actions,
        hidden_sizes=tuple(hidden_sizes),
        torso=torso,
        conv_features=conv_features,
        activation=activation,
        prediction_size=prediction_size,
    )
    return Network(module=module, obs_shape=tuple(obs_shape))


class Network:
    """A flax module bound to an observation shape: pure `init` and `apply`."""

    def __init__(self, module: ActorCritic, obs_shape: tuple[int, ...]):
        self.module = module
        self.obs_shape = obs_shape

    def init(self, key, dtype=jnp.float32):
        """Returns fresh parameters, cast to `dtype`."""
        params = self.module.init(key, jnp.zeros(self.obs_shape), len(self.obs_shape))
        return jax.tree.map(lambda x: x.astype(dtype), params)

    @property
    def prediction_size(self) -> int:
        """Size of the prediction-vector head; 0 when there is none."""
        return self.module.prediction_size

    def apply(self, params, obs):
        """Returns `(logits [..., A], value [...])` for observations `[..., *obs]`."""
        return self._apply(params, obs)[:2]

    def apply_predictions(self, params, obs):
        """Returns `(logits [..., A], value [...], prediction [..., M])`.

        Raises:
          ValueError: if the network has no prediction head.
        """
        if not self.prediction_size:
            raise ValueError(
                "this network has no prediction head; build it with "
                "make_network(..., prediction_size=M)"
            )
        return self._apply(params, obs)

    def _apply(self, params, obs):
        dtype = jax.tree.leaves(params)[0].dtype
        return self.module.apply(params, obs.astype(dtype), len(self.obs_shape))
