"""The installed package carries its Hydra configs."""

import subprocess
import sys
import zipfile
from pathlib import Path

from metarl.cli import config_dir

REPO = Path(__file__).resolve().parents[1]


def test_config_dir_holds_every_group():
    root = config_dir()
    assert (root / "config.yaml").is_file()
    for group in ("env", "agent", "objective", "meta", "logger"):
        assert list((root / group).glob("*.yaml")), group


def test_wheel_ships_configs_inside_metarl(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("metarl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "metarl/configs/config.yaml" in names
    assert "metarl/configs/env/breakout.yaml" in names
    assert "metarl/configs/meta/default.yaml" in names
    assert {"agents/__init__.py", "envs/__init__.py"} <= names
