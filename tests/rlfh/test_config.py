import subprocess
import sys

import pytest
import yaml

from rlfh.config.schema import Config, ConfigError, config_from_dict, load_config, parse_overrides, save_config
from tests.conftest import REPO


def problems_of(data) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    return e.value.problems


def test_defaults_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.gradient_accumulation_steps * cfg.learner.micro_batch_size_per_gpu == cfg.learner.train_batch_size


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_flagship_config_trains_every_region_with_mpd():
    # the README's headline: per-region losses (global, face, hand) balanced by FairHuman's MPD rule
    lc = load_config(REPO / "configs" / "sdxl_faces_dpo.yaml").learner
    assert lc.regions.names == ["global", "face", "hand"] and lc.regions.fairness.rule == "mpd"
    assert lc.max_grad_norm == 1.0


def test_unknown_key_names_key_and_suggests_fix():
    (p,) = problems_of({"learner": {"lrr": 1e-4}})
    assert "learner.lrr" in p and "did you mean learner.lr" in p


def test_unknown_top_level_key():
    (p,) = problems_of({"rolout": {}})
    assert p.startswith("rolout: unknown key") and "rollout" in p


def test_wrong_type_names_key_value_and_type():
    (p,) = problems_of({"learner": {"dpo": {"beta": "lots"}}})
    assert p == "learner.dpo.beta='lots': expected float, got str"


def test_literal_choices():
    (p,) = problems_of({"learner": {"engine": {"zero_stage": 4}}})
    assert "learner.engine.zero_stage=4" in p and "[0, 1, 2, 3]" in p


def test_all_problems_reported_together():
    ps = problems_of({"learner": {"dpo": {"beta": "x"}, "nope": 1}, "seed": "abc"})
    assert len(ps) == 3


def test_inconsistent_batch_sizes():
    ps = problems_of(
        {"learner": {"train_batch_size": 3, "micro_batch_size_per_gpu": 2}, "rollout": {"prompts_per_round": 4}}
    )
    assert any("learner.train_batch_size=3 must be a multiple" in p for p in ps)


def test_actor_share_must_divide():
    ps = problems_of(
        {
            "rollout": {"prompts_per_round": 3, "rollouts_per_prompt": 3},
            "resources": {"num_rollout_actors": 2},
            "learner": {"train_batch_size": 1},
        }
    )
    assert any("not divisible by resources.num_rollout_actors=2" in p for p in ps)


def test_sample_batch_must_divide_share():
    ps = problems_of({"rollout": {"sample_batch_size_per_actor": 3}})
    assert any("rollout.sample_batch_size_per_actor=3" in p for p in ps)


def test_pairs_need_two_rollouts_per_prompt():
    ps = problems_of({"rollout": {"rollouts_per_prompt": 1}})
    assert any("rollout.rollouts_per_prompt=1" in p for p in ps)


def test_height_multiple_of_8():
    ps = problems_of({"rollout": {"height": 60}})
    assert any("rollout.height=60" in p for p in ps)


def test_overrides_parse_and_coerce():
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "run_dir=/tmp/x",
            "learner.lr=1e-4",
            "learner.engine.zero_stage=2",
            "rollout.prompts=[a, b]",
            "logging.wandb=false",
        ],
    )
    assert cfg.run_dir == "/tmp/x"
    assert cfg.learner.lr == 1e-4 and cfg.learner.engine.zero_stage == 2
    assert cfg.rollout.prompts == ["a", "b"] and cfg.logging.wandb is False


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["run_dir"])


def test_reward_shorthand_and_duplicates():
    cfg = config_from_dict({"rewards": ["jpeg_compressibility", {"target": "jpeg_incompressibility", "weight": 0.5}]})
    assert cfg.rewards[0].target == "jpeg_compressibility" and cfg.rewards[1].weight == 0.5
    ps = problems_of({"rewards": ["jpeg_compressibility", "jpeg_compressibility"]})
    assert any("used twice" in p for p in ps)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["seed=3"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["seed"] == 3


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_cli_reports_config_error_with_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "rlfh.cli.main", "config", str(REPO / "configs" / "tiny.yaml"), "learner.dpo.betaa=1"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "learner.dpo.betaa: unknown key; did you mean learner.dpo.beta?" in r.stderr


def test_cli_prints_effective_config():
    r = subprocess.run(
        [sys.executable, "-m", "rlfh.cli.main", "config", str(REPO / "configs" / "tiny.yaml"), "run_dir=/tmp/r"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert yaml.safe_load(r.stdout)["run_dir"] == "/tmp/r"


def test_learner_ranks_colocation_and_sync_bucket_rules_name_their_keys():
    (p,) = problems_of({"resources": {"num_learner_gpus": 4, "num_learner_ranks": 2}})
    assert "resources.num_learner_ranks=2" in p and "one rank per GPU" in p
    (p,) = problems_of({"resources": {"sync_bucket_mb": 0}})
    assert "resources.sync_bucket_mb=0" in p
    problems = problems_of(
        {
            "resources": {"colocate": True, "num_rollout_actors": 2, "placement": "PACK"},
            "rollout": {"max_staleness": 1, "prompts_per_round": 2},
        }
    )
    assert any("resources.colocate=true" in q and "num_rollout_actors=1" in q for q in problems)
    assert any("rollout.max_staleness=0" in q for q in problems)
    assert any("resources.placement=none" in q for q in problems)
    # learner ranks divide the optimizer step: 3 ranks cannot split a batch of 2
    (p,) = problems_of({"resources": {"num_learner_ranks": 3}})
    assert "learner ranks (3)" in p


# ---------------------------------------------------------------------------- the config grouped by role
@pytest.mark.parametrize(
    "override,problem",
    [
        ("learner.beta=10", "learner.beta: moved to learner.dpo.beta"),
        ("learner.ddpo_window=2", "learner.ddpo_window: moved to learner.ddpo.window"),
        ("learner.trust_region=dppo", "learner.trust_region: moved to learner.ddpo.trust_region"),
        ("learner.cfg_distill=5", "learner.cfg_distill: moved to learner.guidance_free.scale"),
        ("learner.zero_stage=2", "learner.zero_stage: moved to learner.engine.zero_stage"),
        ("learner.lora.rank=4", "learner.lora: moved to model.lora"),
        ("learner.hcp.sigma=0.1", "learner.hcp.sigma: moved to data.hcp_priors.sigma"),
        ("learner.hcp.enabled=true", "learner.hcp: moved to model.hcp"),
        ("learner.hgdpo.real_images=/x", "learner.hgdpo: moved to data.hgdpo"),
        ("learner.regions=[global, face]", "learner.regions: moved to learner.regions.names"),
        ("learner.reference=ema", "learner.reference: moved to learner.reference.model"),
    ],
)
def test_moved_key_names_the_new_key(override, problem):
    """An old key on the command line is one problem naming where it went."""
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert e.value.problems == [problem]


def test_moved_keys_in_a_yaml_file(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("learner:\n  beta: 10\n  lora: {rank: 4}\n  hcp: {enabled: true, prior: real}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert sorted(e.value.problems) == [
        "learner.beta: moved to learner.dpo.beta",
        "learner.hcp.prior: moved to data.hcp_priors.prior",
        "learner.hcp: moved to model.hcp",
        "learner.lora: moved to model.lora",
    ]


def test_every_moved_key_names_a_key_of_the_schema():
    from rlfh.config.docs import walk
    from rlfh.config.schema import MOVED_KEYS

    keys = {r["key"] for _, rows in walk(Config) for r in rows}
    sections = {s for s, _ in walk(Config)}
    assert all(new in keys or new in sections for new in MOVED_KEYS.values()), [
        new for new in MOVED_KEYS.values() if new not in keys and new not in sections
    ]


@pytest.mark.parametrize(
    "data,expected",
    [
        ({"learner": {"dpo": {"beta": 0}}}, "learner.dpo.beta=0.0: must be > 0"),
        ({"learner": {"ddpo": {"timestep_fraction": 2}}}, "learner.ddpo.timestep_fraction=2.0: must be in (0, 1]"),
        ({"learner": {"nft": {"adv_clip": -1}}}, "learner.nft.adv_clip=-1.0: must be finite and > 0"),
        ({"learner": {"filtered": {"top_fraction": 0}}}, "learner.filtered.top_fraction=0.0: must be in (0, 1]"),
        (
            {"learner": {"engine": {"offload_params": True}}},
            "learner.engine.offload_params=true needs learner.engine.zero_stage=3",
        ),
        ({"learner": {"regions": {"names": ["global", "global"]}}}, "learner.regions.names=['global', 'global']"),
        ({"model": {"lora": {"rank": 0}}}, "model.lora.rank=0: must be >= 1"),
        ({"data": {"hcp_priors": {"min_visibility": 2}}}, "data.hcp_priors.min_visibility=2.0: must be in [0, 1]"),
        ({"data": {"region_pairs": {"fraction": 0}}}, "data.region_pairs.fraction=0.0: must be in (0, 1]"),
    ],
)
def test_each_section_validates_itself_naming_the_full_key(data, expected):
    (p,) = problems_of(data)
    assert p.startswith(expected), p


def test_a_section_checks_its_knobs_whatever_the_loss():
    # learner.ddpo's own rules hold under loss=dpo too: the section validates itself, not the loss
    ps = problems_of({"learner": {"loss": "dpo", "ddpo": {"branch": True}}})
    assert any(p.startswith("learner.ddpo.branch=true") and "and learner.ddpo.window" in p for p in ps), ps


def test_learner_has_fewer_than_15_shared_fields():
    """learner's own knobs stay few; each loss family adds its one section (the registry's), nothing more."""
    import dataclasses

    from rlfh.config.schema import LearnerConfig
    from rlfh.losses.registry import loss_sections

    names = [f.name for f in dataclasses.fields(LearnerConfig)]
    shared = [n for n in names if n not in loss_sections()]
    assert len(shared) < 15, shared
    assert set(loss_sections()) <= set(names)  # each loss family's section, from the registry
    assert len(names) == len(shared) + len(loss_sections())
