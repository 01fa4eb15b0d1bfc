"""What the command-line entry points share: config discovery and errors."""

import sys
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


def fail(message: str) -> None:
    """Prints a one-line error and exits with status 2."""
    print(f"metarl: error: {message}", file=sys.stderr)
    raise SystemExit(2)


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
