"""Bad values the README promises to refuse "before anything starts": each gives exactly one
problem, naming its key, from ``load_config`` and from ``rlfh config`` (exit 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlfh.config.schema import ConfigError, load_config
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"

# (override, text the one problem must contain: the key as the message names it)
BAD = [
    ("learner.lr=0", "learner.lr=0"),
    ("learner.lr=-1e-4", "learner.lr=-0.0001"),
    ("learner.lr=nan", "learner.lr='nan': must be a finite number"),
    ("learner.lr=.inf", "learner.lr=inf: must be a finite number"),
    ("learner.lr=-.inf", "learner.lr=-inf: must be a finite number"),
    ("learner.dpo.beta=nan", "learner.dpo.beta='nan': must be a finite number"),
    ("learner.dpo.beta=.nan", "learner.dpo.beta=nan: must be a finite number"),
    ("learner.dpo.beta=inf", "learner.dpo.beta='inf': must be a finite number"),
    ("learner.weight_decay=-0.1", "learner.weight_decay=-0.1: must be >= 0"),
    ("learner.adam_betas=[0.9, 1.0]", "learner.adam_betas=[0.9, 1.0]"),
    ("learner.adam_betas=[-0.1, 0.999]", "learner.adam_betas=[-0.1, 0.999]"),
    ("learner.adam_betas=[0.9]", "learner.adam_betas=[0.9]"),
    ("learner.adam_betas=[0.9, .nan]", "learner.adam_betas[1]=nan: must be a finite number"),
    ("learner.max_grad_norm=-1", "learner.max_grad_norm=-1.0: must be >= 0"),
    ("learner.regions.scale=nan", "learner.regions.scale='nan'"),
    ("learner.regions.fairness.alpha=.inf", "learner.regions.fairness.alpha=inf"),
    (
        "learner.regions.fairness.weights={global: .nan}",
        "learner.regions.fairness.weights.global=nan: must be a finite number",
    ),
    ("model.lora.alpha=0", "model.lora.alpha=0.0: must be > 0"),
    ("learner.ema.decay=nan", "learner.ema.decay='nan'"),
    ("rollout.guidance_scale=nan", "rollout.guidance_scale='nan': must be a finite number"),
    ("rollout.eta=-0.5", "rollout.eta=-0.5: must be >= 0"),
    ("rollout.width=100000", "rollout.width=100000: must be at most 4096"),
    ("rollout.height=8192", "rollout.height=8192: must be at most 4096"),
    ("logging.checkpoint_every=0", "logging.checkpoint_every=0: must be >= 1"),
    ("logging.sample_grid_every=-1", "logging.sample_grid_every=-1: must be >= 0"),
    ("resources.num_cpus_per_actor=-1", "resources.num_cpus_per_actor=-1.0: must be >= 0"),
    ("resources.sync_bucket_mb=nan", "resources.sync_bucket_mb='nan'"),
    ("guards.max_reference_mse=.inf", "guards.max_reference_mse=inf"),
    ("reward_server.batch_wait_timeout_s=nan", "reward_server.batch_wait_timeout_s='nan'"),
    ("rewards.0.weight=.nan", "rewards[0].weight=nan: must be a finite number"),
    ("rewards.0.weight=-1", "rewards[0].weight=-1.0: a negative weight"),
    ("rewards.0.target=x", "rewards[0].target='x': unknown reward 'x'"),
    ("rewards=[{target: no_such_module:Reward, name: r}]", "cannot import module 'no_such_module'"),
    ("rewards=[{target: rewards.jpeg:NoSuchClass, name: r}]", "has no attribute 'NoSuchClass'"),
    ("rewards=[{target: rewards.registry:BUILTIN, name: r}]", "dict object is not callable"),
    ("rewards.3.weight=2", "rewards.3: the list has 1 entries"),
    ("rewards=[{target: nope}]", "rewards[0].target='nope': unknown reward"),
    ("guards.heldout_rewards=[{target: nope}]", "guards.heldout_rewards[0].target='nope'"),
    ("learner.adam_betas={a: 1, a: 2}", "key 'a' is given twice"),
]


def _one_problem(override: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert len(e.value.problems) == 1, e.value.problems
    return e.value.problems[0]


@pytest.mark.parametrize("override,expected", BAD, ids=[o for o, _ in BAD])
def test_bad_override_gives_one_problem_naming_the_key(override, expected):
    assert expected in _one_problem(override)


def test_reward_server_config_floats_are_checked_too():
    # if the server section has no such key the table above would pass for the wrong reason
    from rewards.wire import ServerConfig

    assert "batch_wait_timeout_s" in {f.name for f in __import__("dataclasses").fields(ServerConfig)}


def test_negative_weight_is_allowed_when_asked_for():
    cfg = load_config(TINY, ["rewards.0.weight=-0.5", "rewards.0.allow_negative_weight=true"])
    assert cfg.rewards[0].weight == -0.5 and cfg.rewards[0].allow_negative_weight


def test_list_entry_override_edits_that_entry_only(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "rewards:\n  - jpeg_compressibility\n  - target: jpeg_incompressibility\n    weight: 0.5\n"
        "rollout:\n  prompts: [a, b]\n"
    )
    cfg = load_config(path, ["rewards.1.weight=2", "rewards.0.name=small_files"])
    assert [(e.target, e.name, e.weight) for e in cfg.rewards] == [
        ("jpeg_compressibility", "small_files", 1.0),
        ("jpeg_incompressibility", None, 2.0),
    ]
    cfg = load_config(path, ["rollout.prompts.1=c"])
    assert cfg.rollout.prompts == ["a", "c"]


def test_list_entry_override_without_a_list_says_how():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rewards.0.weight=2"])
    (p,) = e.value.problems
    assert p.startswith("rewards: the config has no list here") and "rewards=[...]" in p


def test_unknown_target_is_refused_without_building_any_reward(monkeypatch):
    import rewards.registry as registry

    def no_build(*a, **k):
        raise AssertionError("validation must not build rewards")

    monkeypatch.setattr(registry, "build_reward", no_build)
    assert "unknown reward 'facescor'" in _one_problem("rewards.0.target=facescor")
    # a registry name is checked without importing its (torch-heavy) module
    monkeypatch.delitem(sys.modules, "rewards.facescore", raising=False)
    load_config(TINY, ["rewards.0.target=facescore"])
    assert "rewards.facescore" not in sys.modules


def test_empty_config_file_is_refused(tmp_path):
    for text in ("", "# only a comment\n", "\n\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        (p,) = e.value.problems
        assert f"config file {path} is empty" in p


@pytest.mark.parametrize(
    "text,key,lines",
    [
        ("learner:\n  lr: 1e-4\n  beta: 10\n  lr: 1e-3\n", "lr", (2, 4)),
        ("seed: 1\nlearner: {}\nseed: 2\n", "seed", (1, 3)),
        ("learner: {beta: 1, beta: 2}\n", "beta", (1, 1)),
        ("rewards:\n  - target: jpeg_compressibility\n    weight: 1\n    weight: 2\n", "weight", (3, 4)),
    ],
)
def test_duplicate_yaml_keys_are_refused_with_key_and_lines(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    (p,) = e.value.problems
    assert f"{path}:{lines[1]}: key {key!r} is given twice (lines {lines[0]} and {lines[1]})" in p


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("learner:\n  <<: {lr: 1.0e-4, max_grad_norm: 10}\n  max_grad_norm: 20\n")
    cfg = load_config(path)
    assert cfg.learner.lr == 1e-4 and cfg.learner.max_grad_norm == 20


@pytest.mark.parametrize(
    "override,expected",
    [
        ("learner.dpo.beta=nan", "learner.dpo.beta='nan': must be a finite number"),
        ("rewards.0.target=x", "rewards[0].target='x': unknown reward"),
        ("logging.checkpoint_every=0", "logging.checkpoint_every=0: must be >= 1"),
    ],
)
def test_cli_reports_one_problem_and_no_traceback(override, expected):
    r = subprocess.run(
        [sys.executable, "-m", "rlfh.cli.main", "config", str(TINY), override], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 2, r.stderr
    assert "1 problem(s)" in r.stderr and expected in r.stderr
    assert "Traceback" not in r.stderr
