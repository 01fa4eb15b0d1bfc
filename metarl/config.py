"""Typed, validated run configuration, built from the Hydra YAML at the edge."""

import dataclasses
import math
import types
import typing
from typing import Any

from envs import ENV_IDS
from metarl.metagrad import GRAD_MODES

LOGGER_MODES = ("offline", "online", "disabled")


class ConfigError(ValueError):
    """A configuration a user wrote that cannot run; the message says the fix."""


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Which environments the agents learn in.

    `name` is one environment id or a list of them (`env=[breakout,asterix]`
    on the command line); the population is then split evenly between them.
    """

    name: str | tuple[str, ...] = "breakout"
    max_episode_steps: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The environment ids, in the order the population is split over."""
        return _as_tuple(self.name)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The inner learner's optimiser."""

    name: str = "adam"
    # One step size, or a list of them spread over each environment's agents.
    learning_rate: float | tuple[float, ...] = 1e-3
    max_grad_norm: float | None = None
    eps: float = 1e-8
    # Adam divides by sqrt(nu + eps_root): a positive eps_root keeps second
    # derivatives finite where a gradient coordinate is exactly zero.
    eps_root: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0

    @property
    def learning_rates(self) -> tuple[float, ...]:
        """The step sizes the population's agents use."""
        return _as_tuple(self.learning_rate)


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
    # A saved objective (RUN_DIR/objective) whose parameters meta-training
    # starts from instead of the init_* values.
    init_from: str | None = None


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """The outer loop: meta-steps, population, meta-gradient and meta-loss."""

    steps: int = 1200
    inner_steps: int = 16
    population_size: int = 4
    # Inner updates per agent lifetime: one value, or a list spread over each
    # environment's agents.
    lifetime: int | tuple[int, ...] = 4096
    grad: str = "mixflow"
    checkpoint_every: int = 0
    store_rollout: bool = False
    replay_rollout: bool = True
    store_inner_grad: bool = True
    learning_rate: float = 3e-3
    max_grad_norm: float | None = 1.0
    discount: float = 0.99
    lambda_: float = 0.95
    # Meta-updates skipped in a row for non-finite meta-gradients before the
    # run stops: a run that keeps producing NaNs has diverged.
    max_consecutive_skips: int = 10

    @property
    def lifetimes(self) -> tuple[int, ...]:
        """The lifetimes the population's agents have."""
        return _as_tuple(self.lifetime)


@dataclasses.dataclass(frozen=True)
class LoggerConfig:
    """Where progress goes: console, metrics file, Weights & Biases."""

    # None: WANDB_MODE from the environment if set, else offline.
    mode: str | None = None
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
class CheckpointConfig:
    """How often the whole training state is saved, and how many saves are kept."""

    every: int = 100  # meta-steps between checkpoints; 0: only at the end
    keep: int = 3


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `python -m metarl.train` needs."""

    env: EnvConfig = EnvConfig()
    agent: AgentConfig = AgentConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    meta: MetaConfig = MetaConfig()
    logger: LoggerConfig = LoggerConfig()
    distributed: DistributedConfig = DistributedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    seed: int = 0
    dtype: str = "float32"
    # False: a new run. True: continue the run in the run directory. A path:
    # continue the run in that directory.
    resume: bool | str = False

    def __post_init__(self):
        _validate(self)


def _positive(value, name):
    if value is not None and value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}; set it above 0")


def _choice(value, choices, name):
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got '{value}'")


def _validate(cfg: TrainConfig) -> None:
    agent, meta, opt = cfg.agent, cfg.meta, cfg.agent.optimizer
    for values, name in [
        (opt.learning_rates, "agent.optimizer.learning_rate"),
        (meta.lifetimes, "meta.lifetime"),
        (cfg.env.names, "env.name"),
    ]:
        if not values:
            raise ConfigError(f"{name} must not be an empty list")
        if len(set(values)) < len(values):
            raise ConfigError(f"{name} lists a value twice: {list(values)}")
    for value in opt.learning_rates:
        _positive(value, "agent.optimizer.learning_rate")
    for value in meta.lifetimes:
        _positive(value, "meta.lifetime")
    for value, name in [
        (agent.num_envs, "agent.num_envs"),
        (agent.unroll_length, "agent.unroll_length"),
        (agent.conv_features, "agent.conv_features"),
        (opt.max_grad_norm, "agent.optimizer.max_grad_norm"),
        (opt.eps, "agent.optimizer.eps"),
        (meta.steps, "meta.steps"),
        (meta.inner_steps, "meta.inner_steps"),
        (meta.population_size, "meta.population_size"),
        (meta.learning_rate, "meta.learning_rate"),
        (meta.max_grad_norm, "meta.max_grad_norm"),
        (meta.max_consecutive_skips, "meta.max_consecutive_skips"),
        (cfg.logger.log_every, "logger.log_every"),
        (cfg.checkpoint.keep, "checkpoint.keep"),
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
    for name in cfg.env.names:
        _choice(name, sorted(ENV_IDS), "env.name")
    _check_population(cfg)
    if cfg.logger.mode is not None:
        _choice(cfg.logger.mode, LOGGER_MODES, "logger.mode")
    _choice(cfg.dtype, ("float32", "float64"), "dtype")
    if opt.eps_root < 0 or (opt.name == "rmsprop" and opt.eps_root == 0):
        raise ConfigError(
            "agent.optimizer.eps_root must be positive for rmsprop and non-negative "
            f"otherwise, got {opt.eps_root}"
        )
    if cfg.checkpoint.every < 0:
        raise ConfigError(
            f"checkpoint.every must be 0 (only at the end) or positive, got "
            f"{cfg.checkpoint.every}"
        )
    if cfg.resume == "":
        raise ConfigError(
            "resume must be true, false or a run directory, got an empty string"
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


def population_plan(cfg: TrainConfig) -> list[tuple[str, list[float], list[int]]]:
    """How the population is split: per environment, each agent's settings.

    The agents are split evenly between the environments, in the order
    `env.name` lists them. Within an environment, agent `j` gets learning
    rate `j mod R` and lifetime `(j div R) mod L` of the `R` learning rates
    and `L` lifetimes, so every pairing is present.

    Returns:
      `[(env_name, learning_rates, lifetimes)]`, one list entry per agent.
    """
    names = cfg.env.names
    rates, lifetimes = cfg.agent.optimizer.learning_rates, cfg.meta.lifetimes
    size = cfg.meta.population_size // len(names)
    plan = []
    for name in names:
        agents = range(size)
        plan.append(
            (
                name,
                [rates[j % len(rates)] for j in agents],
                [lifetimes[(j // len(rates)) % len(lifetimes)] for j in agents],
            )
        )
    return plan


def _check_population(cfg: TrainConfig) -> None:
    """Every environment gets as many agents, and every rate-lifetime pairing."""
    names = cfg.env.names
    rates, lifetimes = cfg.agent.optimizer.learning_rates, cfg.meta.lifetimes
    size, combos = cfg.meta.population_size, len(rates) * len(lifetimes)
    needed = len(names) * combos
    suggestion = -(-max(size, needed) // needed) * needed
    if size % len(names):
        raise ConfigError(
            f"meta.population_size={size} does not split evenly between the "
            f"{len(names)} environments; use e.g. meta.population_size={suggestion}"
        )
    if size < needed:
        per = f" per environment x {len(names)} environments" if len(names) > 1 else ""
        raise ConfigError(
            f"meta.population_size={size} is too small for one agent per learning "
            f"rate and lifetime ({len(rates)} x {len(lifetimes)}{per}); use e.g. "
            f"meta.population_size={suggestion}"
        )


_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}


def _example(name: str, annotation: Any, default: Any) -> str:
    """An override of `name` that would be accepted, for error messages."""
    if default is not None and not dataclasses.is_dataclass(default):
        if isinstance(default, bool):
            text = str(default).lower()
        elif isinstance(default, tuple):
            text = "[" + ",".join(str(v) for v in default) + "]"
        else:
            text = str(default)
    else:
        text = {bool: "true", int: "1", float: "1.0", str: "NAME"}.get(annotation, "1")
    return f"{name}={text}"


def _convert(value: Any, annotation: Any, name: str, default: Any = None) -> Any:
    """Checks `value` against `annotation`, converting where the meaning is clear.

    Numbers written as strings (YAML 1.1 reads `1e-3` as one) become numbers,
    and whole floats (`1e3`) become integers; anything else of the wrong type
    is an error whose message shows a valid override.
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [a for a in options if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], name, default)
        # A setting that takes one value or a list of them.
        lists = [a for a in inner if typing.get_origin(a) is tuple]
        if lists and len(inner) == 2:
            (scalar,) = [a for a in inner if a not in lists]
            if isinstance(value, (list, tuple)):
                return _convert(value, lists[0], name, default)
            return _convert(value, scalar, name, default)
        for option in inner:
            if isinstance(value, option) and not (
                option is int and isinstance(value, bool)
            ):
                return value
        kinds = " or ".join(_TYPE_NAMES.get(a, str(a)) for a in inner)
        raise ConfigError(f"{name} must be {kinds}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a group of settings, got {value!r}")
        return from_dict(annotation, value, prefix=name + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{name} must be a list, got {value!r}; write it like "
                f"{_example(name, annotation, default)}"
            )
        item_type = typing.get_args(annotation)[0]
        return tuple(
            _convert(v, item_type, f"{name}[{i}]") for i, v in enumerate(value)
        )
    converted = _convert_scalar(value, annotation)
    if converted is None:
        if annotation not in _TYPE_NAMES:
            raise TypeError(f"unsupported config annotation {annotation} for {name}")
        raise ConfigError(
            f"{name} must be {_TYPE_NAMES[annotation]}, got {value!r}; write it "
            f"like {_example(name, annotation, default)}"
        )
    return converted


def _convert_scalar(value: Any, annotation: Any) -> Any:
    """`value` as `annotation` (bool, int, float or str), or None if it is not one."""
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return None
    if annotation is str:
        return value if isinstance(value, str) else None
    if isinstance(value, bool):
        return None
    if annotation is int and isinstance(value, int):
        return value
    if isinstance(value, str):
        if annotation is int and value.strip().lstrip("+-").isdigit():
            return int(value.strip())
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if annotation is int:
        return int(value) if float(value).is_integer() else None
    if annotation is float:
        return float(value)
    return None


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
        key: _convert(value, hints[key], prefix + key, fields[key].default)
        for key, value in values.items()
    }
    return cls(**kwargs)
