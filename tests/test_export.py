"""Saving and loading objectives: round trip and one-line errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from metarl import (
    ObjectiveFileError,
    ParametricObjective,
    load_objective,
    save_objective,
)


def _save(path):
    objective = ParametricObjective(init_discount=0.9)
    meta_params = objective.init(jnp.float64)
    meta_params["log_entropy_coef"] = jnp.float64(-3.0)
    save_objective(path, objective, meta_params, train_envs=["catch"], meta_step=7)
    return objective, meta_params


def test_round_trip_keeps_parameters_and_spec(tmp_path):
    objective, meta_params = _save(tmp_path / "obj")
    loaded = load_objective(tmp_path / "obj")
    assert loaded.objective == objective
    for key, value in meta_params.items():
        np.testing.assert_array_equal(loaded.meta_params[key], value)
    assert loaded.spec["meta_step"] == 7
    assert loaded.spec["train_envs"] == ["catch"]
    assert loaded.spec["format_version"] == 1
    assert loaded.objective.describe(loaded.meta_params)["entropy_coef"] == (
        pytest.approx(np.exp(-3.0))
    )


def test_missing_folder_is_clear_error(tmp_path):
    with pytest.raises(ObjectiveFileError, match="spec.json is missing"):
        load_objective(tmp_path / "nothing")


def test_newer_format_is_refused(tmp_path):
    _save(tmp_path / "obj")
    spec_path = tmp_path / "obj" / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["format_version"] = 99
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(ObjectiveFileError, match="upgrade metarl"):
        load_objective(tmp_path / "obj")


def test_corrupt_parameters_are_refused(tmp_path):
    _save(tmp_path / "obj")
    (tmp_path / "obj" / "params.npz").write_bytes(b"not an archive")
    with pytest.raises(ObjectiveFileError, match="corrupt"):
        load_objective(tmp_path / "obj")


def test_mismatched_parameter_names_are_refused(tmp_path):
    _save(tmp_path / "obj")
    np.savez(tmp_path / "obj" / "params.npz", other=np.zeros(()))
    with pytest.raises(ObjectiveFileError, match="expects"):
        load_objective(tmp_path / "obj")
