"""The YAML configs and the typed config agree, and bad values are refused."""

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metarl.cli import config_dir
from metarl.config import ConfigError, MetaConfig, TrainConfig, from_dict


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def test_yaml_defaults_equal_dataclass_defaults():
    assert from_dict(TrainConfig, _compose()) == TrainConfig()


def test_env_group_selects_environment():
    assert from_dict(TrainConfig, _compose(["env=asterix"])).env.name == "asterix"


def test_unknown_setting_names_valid_ones():
    with pytest.raises(ConfigError, match="unknown setting meta.foo; valid settings"):
        from_dict(TrainConfig, {"meta": {"foo": 1}})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"meta": {"steps": "abc"}}, "meta.steps must be an integer, got 'abc'"),
        ({"meta": {"inner_steps": 0}}, "meta.inner_steps must be positive, got 0"),
        ({"agent": {"num_envs": -4}}, "agent.num_envs must be positive, got -4"),
        ({"meta": {"grad": "fast"}}, "meta.grad must be one of"),
        ({"objective": {"init_discount": 1.5}}, "strictly between 0 and 1"),
        ({"meta": {"store_rollout": "yes"}}, "must be true or false"),
        ({"agent": {"hidden_sizes": []}}, "non-empty list of positive widths"),
    ],
)
def test_bad_values_are_one_line_errors(values, message):
    with pytest.raises(ConfigError, match=message) as info:
        from_dict(TrainConfig, values)
    assert "\n" not in str(info.value)


def test_integers_are_accepted_for_float_settings():
    config = from_dict(TrainConfig, {"meta": {"learning_rate": 1}})
    assert config.meta.learning_rate == 1.0
    assert isinstance(config.meta.learning_rate, float)


def test_default_meta_gradient_is_mixflow_through_at_least_16_updates():
    meta = MetaConfig()
    assert meta.grad == "mixflow"
    assert meta.inner_steps >= 16


def test_objective_settings_default_to_the_objectives_own_defaults():
    # ObjectiveConfig repeats each objective's hyperparameters for the command
    # line; their defaults must not drift apart.
    from metarl.objectives import OBJECTIVES, objective_from_config

    for name, cls in OBJECTIVES.items():
        config = dataclasses.replace(TrainConfig().objective, name=name)
        assert objective_from_config(config) == cls(), name
