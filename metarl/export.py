"""Saving and loading learned objectives as versioned folders."""

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metarl.objectives import OBJECTIVES, make_objective

FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
PARAMS_FILE = "params.npz"


class ObjectiveFileError(ValueError):
    """A saved objective that is missing, corrupt or incompatible."""


@dataclasses.dataclass(frozen=True)
class LoadedObjective:
    """A learned objective read back from disk.

    Attributes:
      objective: the objective, e.g. a `ParametricObjective`.
      meta_params: its learned parameters.
      spec: the saved description (format version, training environments,
        meta-step, metarl version, ...).
    """

    objective: Any
    meta_params: dict[str, jax.Array]
    spec: dict

    def loss(self, network, params, trajectory):
        """The learned loss of an agent on a `[T, B]` trajectory: `(loss, metrics)`."""
        return self.objective.loss(network, params, self.meta_params, trajectory)


def _version() -> str:
    from metarl import __version__

    return __version__


def save_objective(
    path: str | os.PathLike,
    objective,
    meta_params: dict[str, Any],
    *,
    train_envs: list[str],
    meta_step: int,
) -> Path:
    """Writes `objective` and its parameters to the folder `path`.

    The folder holds `spec.json` (format version, objective name and
    hyperparameters, the per-step input features it reads, parameter names
    and shapes, metarl version, training
    environments, meta-step) and `params.npz`. Both are written to temporary
    files first and renamed, so a crash never leaves a half-written file.

    Args:
      path: the folder; created if missing, its two files replaced.
      objective: the objective (it provides `name` and `spec()`).
      meta_params: a flat dict of arrays.
      train_envs: names of the environments it was trained on.
      meta_step: the meta-step the parameters come from.

    Returns:
      The folder's path.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(jax.device_get(v)) for k, v in meta_params.items()}
    spec = {
        "format_version": FORMAT_VERSION,
        "objective": objective.name,
        "hyperparameters": objective.spec(),
        "input_features": list(getattr(objective, "input_features", ())),
        "params": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype)}
            for k, v in arrays.items()
        },
        "metarl_version": _version(),
        "train_envs": list(train_envs),
        "meta_step": int(meta_step),
    }
    with tempfile.NamedTemporaryFile(dir=path, suffix=".npz", delete=False) as f:
        np.savez(f, **arrays)
    os.replace(f.name, path / PARAMS_FILE)
    with tempfile.NamedTemporaryFile("w", dir=path, suffix=".json", delete=False) as f:
        json.dump(spec, f, indent=2)
    os.replace(f.name, path / SPEC_FILE)
    return path


def load_objective(path: str | os.PathLike) -> LoadedObjective:
    """Reads an objective written by `save_objective`, checking everything.

    Args:
      path: the folder that `save_objective` wrote.

    Returns:
      A `LoadedObjective`.

    Raises:
      ObjectiveFileError: if a file is missing or corrupt, the format is newer
        than this metarl reads, the objective is unknown, its input features
        differ from the ones this metarl's objective reads, or the parameters
        do not match the spec.
    """
    path = Path(path)
    spec_path, params_path = path / SPEC_FILE, path / PARAMS_FILE
    for required in (spec_path, params_path):
        if not required.is_file():
            raise ObjectiveFileError(
                f"no saved objective at {path}: {required.name} is missing; pass "
                "the folder that training wrote (RUN_DIR/objective)"
            )
    try:
        spec = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ObjectiveFileError(f"{spec_path} is not valid JSON ({error})") from error
    version = spec.get("format_version")
    if not isinstance(version, int):
        raise ObjectiveFileError(f"{spec_path} has no integer format_version")
    if version > FORMAT_VERSION:
        raise ObjectiveFileError(
            f"{path} has format version {version}, newer than this metarl reads "
            f"({FORMAT_VERSION}); upgrade metarl"
        )
    name = spec.get("objective")
    if name not in OBJECTIVES:
        raise ObjectiveFileError(
            f"{spec_path} names unknown objective '{name}'; known: "
            f"{', '.join(OBJECTIVES)}"
        )
    try:
        objective = make_objective(name, **spec.get("hyperparameters", {}))
    except TypeError as error:
        raise ObjectiveFileError(
            f"{spec_path} has hyperparameters that {name} does not take ({error})"
        ) from error
    saved_features = spec.get("input_features")
    features = list(getattr(objective, "input_features", ()))
    if saved_features is not None and saved_features != features:
        raise ObjectiveFileError(
            f"{spec_path} expects input features {saved_features}, but this "
            f"metarl's {name} reads {features}; use the metarl version that saved it"
        )
    try:
        with np.load(params_path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as error:  # numpy raises many types for a damaged archive
        raise ObjectiveFileError(f"{params_path} is corrupt ({error})") from error
    expected = spec.get("params", {})
    reference = objective.init()
    if set(arrays) != set(expected) or set(arrays) != set(reference):
        raise ObjectiveFileError(
            f"{params_path} holds parameters {sorted(arrays)}, but {name} expects "
            f"{sorted(reference)}"
        )
    for key, array in arrays.items():
        if (
            list(array.shape) != expected[key]["shape"]
            or array.shape != reference[key].shape
        ):
            raise ObjectiveFileError(
                f"{params_path}: parameter {key} has shape {list(array.shape)}, "
                f"expected {expected[key]['shape']}"
            )
        if not np.all(np.isfinite(array)):
            raise ObjectiveFileError(f"{params_path}: parameter {key} is not finite")
    meta_params = {k: jnp.asarray(v) for k, v in arrays.items()}
    return LoadedObjective(objective=objective, meta_params=meta_params, spec=spec)
