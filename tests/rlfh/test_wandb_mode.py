"""One rule for the wandb mode: the config's logging.wandb_mode when set, else $WANDB_MODE (rlfh's
default offline), so `WANDB_MODE=online rlfh train ...` syncs as the README says."""

import pytest

from rlfh.config.schema import config_from_dict
from rlfh.run.metrics import MetricsLogger


@pytest.mark.parametrize(
    "env, config, expected",
    [
        ("online", None, "online"),  # the README's WANDB_MODE=online
        (None, None, "offline"),  # nothing set: rlfh's default
        ("online", "offline", "offline"),  # an explicit config value wins
        ("offline", "disabled", None),  # disabled: wandb never starts
    ],
)
def test_wandb_mode_rule(env, config, expected, tmp_path, monkeypatch):
    import wandb

    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    seen = []

    class Run:
        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: seen.append(kw["mode"]) or Run())
    logging = {"wandb": True} if config is None else {"wandb": True, "wandb_mode": config}
    cfg = config_from_dict({"logging": logging})
    assert cfg.logging.wandb_mode == config
    MetricsLogger(tmp_path, cfg).close()
    assert seen == ([] if expected is None else [expected])


def test_wandb_mode_rejects_unknown_values():
    from rlfh.config.schema import ConfigError

    with pytest.raises(ConfigError, match="logging.wandb_mode"):
        config_from_dict({"logging": {"wandb_mode": "sync"}})
