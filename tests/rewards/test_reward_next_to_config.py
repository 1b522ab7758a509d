"""A custom ``module:callable`` reward saved next to the config (or in the working directory) loads
without PYTHONPATH, in this process and in the processes it starts (the reward actor's)."""

import os
import subprocess
import sys

import pytest

from rewards.registry import resolve

REWARD = '''
from rewards.jpeg import JpegCompressibility


def make(**options):
    return JpegCompressibility()
'''


@pytest.fixture()
def clean_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    yield
    for name in ("near_config_reward", "in_cwd_reward"):
        sys.modules.pop(name, None)


def test_reward_module_next_to_the_config(tmp_path, monkeypatch, clean_path):
    from rlfh.config.schema import ConfigError, load_config

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "near_config_reward.py").write_text(REWARD)
    (folder / "run.yaml").write_text("rewards:\n  - target: near_config_reward:make\n    name: mine\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError, match="near_config_reward"):  # without the config's folder: not found
        from rlfh.config.schema import config_from_dict

        config_from_dict({"rewards": [{"target": "near_config_reward:make", "name": "mine"}]})
    cfg = load_config(folder / "run.yaml")
    assert cfg.rewards[0].target == "near_config_reward:make"
    assert resolve("near_config_reward:make")().__class__.__name__ == "JpegCompressibility"
    # a process started from here (the private Ray cluster's workers) imports it too
    r = subprocess.run(
        [sys.executable, "-c", "import near_config_reward"], cwd=elsewhere, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_reward_module_in_the_working_directory(tmp_path, monkeypatch, clean_path):
    from rlfh.config.schema import load_config

    (tmp_path / "in_cwd_reward.py").write_text(REWARD)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "run.yaml").write_text("rewards:\n  - target: in_cwd_reward:make\n    name: mine\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/run.yaml").rewards[0].name == "mine"
