"""Typed, validated run configuration, built from the Hydra YAML at the edge."""

import dataclasses
import types
import typing
from typing import Any

from metarl.metagrad import GRAD_MODES


class ConfigError(ValueError):
    """A configuration a user wrote that cannot run; the message says the fix."""


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Which environment the agents learn in."""

    name: str = "breakout"
    max_episode_steps: int | None = None


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The inner learner's optimiser."""

    name: str = "adam"
    learning_rate: float = 1e-3
    max_grad_norm: float | None = None
    eps: float = 1e-8
    # Adam divides by sqrt(nu + eps_root): a positive eps_root keeps second
    # derivatives finite where a gradient coordinate is exactly zero.
    eps_root: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """The actor-critic agents of the population."""

    num_envs: int = 32
    unroll_length: int = 16
    torso: str = "mlp"
    hidden_sizes: tuple[int, ...] = (64, 64)
    conv_features: int = 16
    activation: str = "tanh"
    optimizer: OptimizerConfig = OptimizerConfig()


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The learned objective and where its parameters start."""

    name: str = "parametric"
    # parametric: where the learned scalars start.
    init_discount: float = 0.99
    init_lambda: float = 0.95
    init_entropy_coef: float = 0.01
    init_value_coef: float = 0.5
    # learned_targets: the meta-network, the agent's prediction vector and
    # the regularisers that keep the targets stable.
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


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """The outer loop: meta-steps, population, meta-gradient and meta-loss."""

    steps: int = 1200
    inner_steps: int = 16
    population_size: int = 4
    lifetime: int = 4096
    grad: str = "mixflow"
    checkpoint_every: int = 0
    store_rollout: bool = True
    store_inner_grad: bool = True
    learning_rate: float = 3e-3
    max_grad_norm: float | None = 1.0
    discount: float = 0.99
    lambda_: float = 0.95


@dataclasses.dataclass(frozen=True)
class LoggerConfig:
    """Where progress goes: console, metrics file, Weights & Biases."""

    mode: str = "offline"
    project: str = "metarl"
    entity: str | None = None
    name: str | None = None
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Several processes (hosts) that run one meta-step together.

    With `enabled`, `jax.distributed.initialize` connects the processes; the
    three settings left unset are detected from the cluster environment
    (SLURM, Open MPI, Kubernetes, ...) the way JAX does.
    """

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        given = [
            f"distributed.{name}"
            for name in ("coordinator_address", "num_processes", "process_id")
            if getattr(self, name) is not None
        ]
        if given and not self.enabled:
            raise ConfigError(
                f"{', '.join(given)} set but distributed.enabled is false; add "
                "distributed.enabled=true or drop them"
            )
        if self.num_processes is not None and self.num_processes <= 0:
            raise ConfigError(
                f"distributed.num_processes must be positive, got {self.num_processes}"
            )
        if self.process_id is not None and not (
            0 <= self.process_id < (self.num_processes or self.process_id + 1)
        ):
            raise ConfigError(
                "distributed.process_id must lie in [0, distributed.num_processes), "
                f"got {self.process_id}"
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `python -m metarl.train` needs."""

    env: EnvConfig = EnvConfig()
    agent: AgentConfig = AgentConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    meta: MetaConfig = MetaConfig()
    logger: LoggerConfig = LoggerConfig()
    distributed: DistributedConfig = DistributedConfig()
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        _validate(self)


def _positive(value, name):
    if value is not None and value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")


def _choice(value, choices, name):
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got '{value}'")


def _validate(cfg: TrainConfig) -> None:
    agent, meta, opt = cfg.agent, cfg.meta, cfg.agent.optimizer
    for value, name in [
        (agent.num_envs, "agent.num_envs"),
        (agent.unroll_length, "agent.unroll_length"),
        (agent.conv_features, "agent.conv_features"),
        (opt.learning_rate, "agent.optimizer.learning_rate"),
        (opt.max_grad_norm, "agent.optimizer.max_grad_norm"),
        (opt.eps, "agent.optimizer.eps"),
        (meta.steps, "meta.steps"),
        (meta.inner_steps, "meta.inner_steps"),
        (meta.population_size, "meta.population_size"),
        (meta.lifetime, "meta.lifetime"),
        (meta.learning_rate, "meta.learning_rate"),
        (meta.max_grad_norm, "meta.max_grad_norm"),
        (cfg.logger.log_every, "logger.log_every"),
        (cfg.env.max_episode_steps, "env.max_episode_steps"),
    ]:
        _positive(value, name)
    if not agent.hidden_sizes or min(agent.hidden_sizes) <= 0:
        raise ConfigError(
            f"agent.hidden_sizes must be a non-empty list of positive widths, got "
            f"{list(agent.hidden_sizes)}"
        )
    _choice(agent.torso, ("mlp", "conv"), "agent.torso")
    _choice(agent.activation, ("tanh", "relu"), "agent.activation")
    _choice(opt.name, ("adam", "rmsprop", "sgd"), "agent.optimizer.name")
    _choice(meta.grad, GRAD_MODES, "meta.grad")
    _choice(cfg.objective.name, ("parametric", "learned_targets"), "objective.name")
    _choice(cfg.logger.mode, ("offline", "online", "disabled"), "logger.mode")
    _choice(cfg.dtype, ("float32", "float64"), "dtype")
    if opt.eps_root < 0 or (opt.name == "rmsprop" and opt.eps_root == 0):
        raise ConfigError(
            "agent.optimizer.eps_root must be positive for rmsprop and non-negative "
            f"otherwise, got {opt.eps_root}"
        )
    if meta.checkpoint_every < 0:
        raise ConfigError(
            f"meta.checkpoint_every must be 0 (off) or positive, got "
            f"{meta.checkpoint_every}"
        )
    for value, name in [
        (cfg.objective.init_discount, "objective.init_discount"),
        (cfg.objective.init_lambda, "objective.init_lambda"),
        (meta.discount, "meta.discount"),
        (meta.lambda_, "meta.lambda_"),
    ]:
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{name} must lie strictly between 0 and 1, got {value}")
    for value, name in [
        (cfg.objective.init_entropy_coef, "objective.init_entropy_coef"),
        (cfg.objective.init_value_coef, "objective.init_value_coef"),
        (cfg.objective.prediction_size, "objective.prediction_size"),
        (cfg.objective.embed_size, "objective.embed_size"),
        (cfg.objective.hidden_size, "objective.hidden_size"),
    ]:
        _positive(value, name)


def _convert(value: Any, annotation: Any, name: str) -> Any:
    """Checks `value` against `annotation`, converting lists and ints."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [a for a in options if a is not type(None)]
        return _convert(value, inner[0], name)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a group of settings, got {value!r}")
        return from_dict(annotation, value, prefix=name + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item_type = typing.get_args(annotation)[0]
        return tuple(
            _convert(v, item_type, f"{name}[{i}]") for i, v in enumerate(value)
        )
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation} for {name}")


def from_dict(cls, values: dict, prefix: str = ""):
    """Builds the config dataclass `cls` from plain `values`, checking types.

    Args:
      cls: a config dataclass such as `TrainConfig`.
      values: nested dicts and lists, as `OmegaConf.to_container` gives them.
      prefix: dotted path of `values`, for error messages.

    Returns:
      An instance of `cls`; settings missing from `values` keep their defaults.

    Raises:
      ConfigError: for an unknown setting, a value of the wrong type, or a
        combination of values that cannot run.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown setting {prefix}{unknown[0]}; valid settings under "
            f"'{prefix.rstrip('.') or 'the top level'}': {', '.join(sorted(fields))}"
        )
    kwargs = {
        key: _convert(value, hints[key], prefix + key) for key, value in values.items()
    }
    return cls(**kwargs)
