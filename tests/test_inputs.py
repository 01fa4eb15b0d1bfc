"""Bad input: a one-line error that names the problem and the fix, exit status 2.

Checked in-process through the functions the command line calls, before
Hydra or the trainer start; `test_resume_cli.py` runs a few as real commands.
"""

import pytest

import metarl.train
from metarl.checkpoint import CheckpointError, find_run
from metarl.cli import compose_config
from metarl.config import ConfigError, MetaConfig, TrainConfig, from_dict
from metarl.export import ObjectiveFileError
from metarl.guard import RunStopped
from metarl.logger import wandb_mode
from metarl.train import check_command

META = MetaConfig()


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        check_command(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("metarl: error: ")
    return err.strip().removeprefix("metarl: error: ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["meta.foo=1"],
            "unknown setting meta.foo; valid settings under 'meta': checkpoint_every,",
        ),
        (["+foo=1"], "unknown setting foo; valid settings under 'the top level'"),
        (
            ["meta.steps.x=1"],
            "unknown setting meta.steps.x: meta.steps is a value, not a group",
        ),
        (["env=nosuchgame"], "unknown env 'nosuchgame'; choose one of: acrobot,"),
        (["checkpoint=often"], "unknown checkpoint 'often'; choose one of: default"),
        (
            ["meta.steps=abc"],
            f"meta.steps must be an integer, got 'abc'; write it like "
            f"meta.steps={META.steps}",
        ),
        (
            ["meta.steps=2.5"],
            f"meta.steps must be an integer, got 2.5; write it like "
            f"meta.steps={META.steps}",
        ),
        (
            ["meta.learning_rate=fast"],
            "meta.learning_rate must be a number, got 'fast'; write it like "
            f"meta.learning_rate={META.learning_rate}",
        ),
        (["meta.learning_rate=nan"], "meta.learning_rate must be a number, got nan"),
        (
            ["agent.hidden_sizes=64"],
            "agent.hidden_sizes must be a list, got 64; write it like "
            "agent.hidden_sizes=[64,64]",
        ),
        (["meta.steps=0"], "meta.steps must be positive, got 0; set it above 0"),
        (
            ["agent.num_envs=-4"],
            "agent.num_envs must be positive, got -4; set it above 0",
        ),
        (
            ["checkpoint.every=-1"],
            "checkpoint.every must be 0 (only at the end) or positive, got -1",
        ),
        (
            ["meta.max_consecutive_skips=0"],
            "meta.max_consecutive_skips must be positive, got 0",
        ),
        (["logger.mode=loud"], "logger.mode must be one of offline, online, disabled"),
        (
            ["meta.steps=[1,2"],
            "cannot read the override 'meta.steps=[1,2' (no viable alternative at "
            "input '[1,2'); write settings as key=value, e.g. meta.steps=100",
        ),
        (
            ["resume=true"],
            "resume=true continues the run in hydra.run.dir; pass "
            "hydra.run.dir=RUN_DIR too, or resume=RUN_DIR",
        ),
    ],
)
def test_bad_command_line_is_one_line_error(capsys, argv, message):
    assert _error(capsys, argv).startswith(message)


def test_resume_of_missing_directory_creates_nothing(capsys, tmp_path):
    missing = tmp_path / "no-such-run"
    message = _error(capsys, [f"resume={missing}"])
    assert message == (
        f"resume: there is no run directory at {missing}; pass resume=PATH with the "
        "folder of an earlier run"
    )
    assert not missing.exists()


def test_resume_of_directory_without_checkpoints(capsys, tmp_path):
    message = _error(capsys, ["resume=true", f"hydra.run.dir={tmp_path}"])
    assert message.startswith(
        f"resume: {tmp_path} holds no checkpoints/ folder, so there is nothing to "
        "resume; resume=true continues the run in hydra.run.dir"
    )


def test_new_run_into_used_directory_is_refused(capsys, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"meta_step": 1}\n')
    message = _error(capsys, [f"hydra.run.dir={tmp_path}"])
    assert message == (
        f"{tmp_path} already holds a run; add resume=true to continue it, or pick "
        "another hydra.run.dir"
    )
    assert (tmp_path / "metrics.jsonl").read_text() == '{"meta_step": 1}\n'


def test_good_command_passes_and_resume_path_becomes_the_run_dir(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert check_command(["meta.learning_rate=1e-3", "env=catch"]) == [
        "meta.learning_rate=1e-3",
        "env=catch",
    ]
    assert check_command([f"resume={tmp_path}"]) == [
        f"resume={tmp_path}",
        f"hydra.run.dir={tmp_path}",
    ]


def test_numbers_written_as_strings_are_numbers():
    """YAML 1.1 reads `1e-3` as a string; quoted numbers are accepted too."""
    config = from_dict(
        TrainConfig,
        {
            "meta": {"learning_rate": "1e-3", "steps": "200", "inner_steps": 8.0},
            "agent": {"optimizer": {"eps": " 1.0e-8 "}},
            "checkpoint": {"every": "50"},
        },
    )
    assert config.meta.learning_rate == 0.001
    assert config.meta.steps == 200 and isinstance(config.meta.steps, int)
    assert config.meta.inner_steps == 8 and isinstance(config.meta.inner_steps, int)
    assert config.agent.optimizer.eps == 1e-8
    assert config.checkpoint.every == 50


@pytest.mark.parametrize(
    "values, message",
    [
        ({"meta": {"store_rollout": "maybe"}}, "meta.store_rollout must be true or"),
        ({"seed": True}, "seed must be an integer, got True"),
        ({"resume": 3}, "resume must be true or false or a string, got 3"),
        ({"resume": ""}, "resume must be true, false or a run directory"),
        ({"env": {"name": "pong"}}, "env.name must be one of acrobot,"),
        ({"checkpoint": {"keep": 0}}, "checkpoint.keep must be positive, got 0"),
    ],
)
def test_bad_values_in_config_files(values, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        from_dict(TrainConfig, values)


def test_wandb_mode_from_config_then_environment(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode(None) == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE must be one of offline, online"):
        wandb_mode(None)


def test_find_run_refuses_a_run_killed_before_its_first_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError, match="holds no checkpoints/ folder"):
        find_run(str(tmp_path), tmp_path)
    assert find_run(False, tmp_path / "new") == (tmp_path / "new", False)


def test_resume_path_and_other_run_dir_conflict(capsys, tmp_path):
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    message = _error(
        capsys, [f"resume={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'b'}"]
    )
    assert message == (
        f"resume={tmp_path / 'a'} and hydra.run.dir={tmp_path / 'b'} name different "
        "run directories; pass only resume=RUN_DIR"
    )


@pytest.mark.parametrize(
    "error, code",
    [
        (RunStopped("stopped at meta-step 6: 3 meta-updates in a row", 3), 3),
        (RunStopped("stopped by signal 15 after meta-step 2", 143), 143),
        (CheckpointError("checkpoint x cannot be read"), 2),
        (ObjectiveFileError("no saved objective at y"), 2),
    ],
)
def test_command_maps_stops_and_bad_files_to_exit_status(
    monkeypatch, capsys, tmp_path, error, code
):
    def failing_run(config, run_dir, resolved):
        raise error

    monkeypatch.setattr(metarl.train, "run", failing_run)
    with pytest.raises(SystemExit) as exit_info:
        metarl.train.run_command(compose_config(["env=catch"]), tmp_path / "r", [])
    assert exit_info.value.code == code
    assert capsys.readouterr().err.strip() == f"metarl: error: {error}"


def test_bad_wandb_mode_and_missing_objective_fail_before_hydra(
    capsys, monkeypatch, tmp_path
):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert _error(capsys, [f"hydra.run.dir={tmp_path / 'a'}"]).startswith(
        "WANDB_MODE must be one of offline, online, disabled, got 'sometimes'"
    )
    monkeypatch.delenv("WANDB_MODE")
    missing = tmp_path / "objective"
    message = _error(
        capsys, [f"objective.init_from={missing}", f"hydra.run.dir={tmp_path / 'b'}"]
    )
    assert message == (
        f"no saved objective at {missing}: spec.json is missing; pass the folder "
        "that training wrote (RUN_DIR/objective)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []
