"""What the command-line entry points share: config discovery and errors."""

import dataclasses
import logging
import sys
import typing
from pathlib import Path

import metarl


def config_dir() -> Path:
    """The folder of metarl's Hydra configs, from a checkout or an install."""
    package = Path(metarl.__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"metarl's configs are missing (looked in {package / 'configs'} and "
        f"{package.parent / 'configs'}); reinstall metarl"
    )


def quiet_backend_probing() -> None:
    """Hides JAX's INFO lines about accelerator backends it did not find.

    JAX reports each one (TPU, CUDA) at INFO level, which Hydra would print
    and write to the command's log file on every start.
    """
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def fail(message: str, exit_code: int = 2) -> None:
    """Prints a one-line error and exits, by default with status 2 (bad input)."""
    print(f"metarl: error: {message}", file=sys.stderr)
    raise SystemExit(exit_code)


def check_group_choices(argv: list[str], groups: tuple[str, ...]) -> None:
    """Exits with a one-line error if an override picks a missing config.

    Hydra's own message for `env=nosuchgame` spans many lines; this names the
    valid choices on one.
    """
    root = config_dir()
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in groups:
            continue
        choices = sorted(p.stem for p in (root / key).glob("*.yaml"))
        if value not in choices:
            fail(f"unknown {key} '{value}'; choose one of: {', '.join(choices)}")


def expand_env_list(argv: list[str]) -> list[str]:
    """`argv` with `env=[a,b]` written as `env=a env.name=[a,b]`.

    Choosing several options of one Hydra config group merges them, which for
    environments would keep only the last one's name; a list of training
    environments is a list-valued `env.name` instead, on top of the first
    environment's config.

    Args:
      argv: the command-line arguments after the program name.

    Returns:
      The arguments, with each `env=[...]` replaced by the two overrides.
    """
    expanded = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        value = value.strip()
        if key != "env" or not (value.startswith("[") and value.endswith("]")):
            expanded.append(arg)
            continue
        names = [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
        if not names:
            fail("env=[] lists no environment; write e.g. env=[breakout,asterix]")
        expanded += [f"env={names[0]}", f"env.name=[{','.join(names)}]"]
    return expanded


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_key(key: str, schema) -> None:
    """Fails unless the dotted `key` names a setting of the dataclass `schema`."""
    cls, parts = schema, key.split(".")
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        where = ".".join(parts[:depth])
        if part not in fields:
            fail(
                f"unknown setting {key}; valid settings under "
                f"'{where or 'the top level'}': {', '.join(sorted(fields))}"
            )
        hint = typing.get_type_hints(cls)[part]
        if depth < len(parts) - 1:
            if not dataclasses.is_dataclass(hint):
                parent = ".".join(parts[: depth + 1])
                fail(f"unknown setting {key}: {parent} is a value, not a group")
            cls = hint


def override_keys(overrides: list[str]) -> list[str]:
    """The settings or groups that command-line `overrides` set, Hydra's aside.

    Args:
      overrides: `key=value` overrides, as Hydra records them.

    Returns:
      The dotted keys (`meta.steps`) and group names (`env`), in order.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    keys = []
    for parsed in parser.parse_overrides(list(overrides)):
        key = parsed.key_or_group
        if not (key == "hydra" or key.startswith("hydra.") or parsed.is_delete()):
            keys.append(key)
    return keys


def compose_config(overrides: list[str], config_name: str = "config") -> dict:
    """A configuration with `overrides`, resolved, as Hydra would build it.

    Composing does not touch the disk, so a command can be checked before
    Hydra creates its run directory.

    Args:
      overrides: the command-line overrides.
      config_name: the top config, `config` (training) or `evaluate`.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(config_dir().absolute()), version_base=None):
        cfg = compose(config_name, overrides=[a for a in overrides if a[:1] != "-"])
    return OmegaConf.to_container(cfg, resolve=True)


def check_overrides(argv: list[str], groups: tuple[str, ...], schema) -> None:
    """Exits with a one-line error for an override Hydra would reject at length.

    Hydra's messages for an unknown option (`meta.foo=1`), a missing config
    (`env=nosuchgame`) or a malformed override span several lines and a
    traceback hint; these name the problem and the valid choices on one.

    Args:
      argv: the command-line arguments after the program name.
      groups: the config groups, chosen as `group=option`.
      schema: the configuration dataclass the settings must belong to.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if not a.startswith("-")]
    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parsed = parser.parse_overrides([arg])[0]
        except Exception as error:  # Hydra's parser raises several types
            fail(
                f"cannot read the override '{arg}' ({_first_line(error)}); write "
                "settings as key=value, e.g. meta.steps=100"
            )
        key = parsed.key_or_group
        if key == "hydra" or key.startswith("hydra.") or parsed.is_delete():
            continue
        if key in groups:
            continue
        _check_key(key, schema)
    check_group_choices(overrides, groups)
