"""The config rule that reads the model family (rlfh/config/rules.py: family_rules): a family rlfh does not
implement, a model.family that disagrees with model.path, and a method a family does not apply are refused
before anything starts, each with its reason. No model is loaded: `rlfh:tiny-<family>` names its family."""

import json
from dataclasses import replace

import pytest

import families
from families.sd15 import SD15
from rlfh.config.schema import ConfigError, load_config
from tests.conftest import REPO


def config(*overrides):
    return load_config(REPO / "configs" / "tiny.yaml", ["logging.wandb=false", *overrides])


def test_sd15_and_sdxl_take_every_method_of_the_tiny_config():
    for path in ("rlfh:tiny-sd15", "rlfh:tiny-sdxl"):
        assert config(f"model.path={path}", "model.hcp.enabled=true", "rollout.guidance_scale=5").model.path == path
    assert config("model.path=rlfh:tiny-sd15", "model.family=sd15").model.family == "sd15"


# A pipeline rlfh has no adapter for, entered as planned (families.NOT_YET) by the tests that need one.
PLANNED = {"QwenImagePipeline": "qwen_image"}


def test_families_not_implemented_yet_are_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(families, "NOT_YET", PLANNED)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    with pytest.raises(ConfigError, match="QwenImagePipeline.*not implemented yet.*StableDiffusionPipeline"):
        config(f"model.path={tmp_path}")
    with pytest.raises(ConfigError, match="model.family=qwen_image: model family 'qwen_image' is not implemented yet"):
        config("model.family=qwen_image")


def test_a_family_that_disagrees_with_the_model_is_refused():
    with pytest.raises(ConfigError, match="model.family=sd15 but model.path=rlfh:tiny-sdxl.*family 'sdxl'"):
        config("model.family=sd15", "model.path=rlfh:tiny-sdxl")
    with pytest.raises(ConfigError, match="model.family=sd2: unknown model family 'sd2'"):
        config("model.family=sd2")


class NoHcP(SD15):
    name = "nohcp"
    refused = {"hcp": "this family has no UNet cross-attention", "ddpo": "this family has no DDIM sampler"}


def test_a_method_the_family_refuses_is_refused_with_its_reason(monkeypatch):
    monkeypatch.setitem(families.FAMILIES, "nohcp", NoHcP())
    assert config("model.path=rlfh:tiny-nohcp").model.path == "rlfh:tiny-nohcp"
    with pytest.raises(ConfigError) as e:
        config(
            "model.path=rlfh:tiny-nohcp",
            "model.hcp.enabled=true",
            "learner.loss=ddpo",
            "rollout.scheduler=ddim",
            "rollout.eta=1.0",
        )
    assert "model.hcp.enabled=true does not apply to the nohcp model family: this family has no UNet" in str(e.value)
    assert "learner.loss=ddpo does not apply to the nohcp model family: this family has no DDIM sampler" in str(e.value)


def test_readme_families_table_is_generated_from_the_refusals():
    """README's families x methods table is rlfh.config.family_methods' output: a refusal added to a family,
    a loss added to the registry or a family implemented shows there or this test fails."""
    from rlfh.config.family_methods import in_readme, render

    table = in_readme((REPO / "README.md").read_text())
    assert table is not None, "README.md lost its families table markers"
    assert table == render(), "README.md's families table is stale: paste `python -m rlfh.config.family_methods`"


def test_the_table_lists_every_method_a_config_can_ask_for_and_each_refusal_with_its_reason(monkeypatch):
    from rlfh.config.family_methods import known_methods, render, unknown_refusals
    from rlfh.config.rules import OPTION_METHODS, methods_in_use
    from rlfh.losses.registry import LOSSES

    # CFG-free training samples without guidance: the options in two configs
    asked = {*methods_in_use(config("model.hcp.enabled=true", "learner.guidance_free.scale=3"))}
    asked |= {*methods_in_use(config("rollout.guidance_scale=5"))}
    # score guidance needs a FaceScore reward to validate; the rules read only its switch
    cfg = config()
    guided = replace(cfg, rollout=replace(cfg.rollout, score_guidance=replace(cfg.rollout.score_guidance, mu=1.0)))
    asked |= {*methods_in_use(guided)}
    assert asked == {"dpo", *OPTION_METHODS}
    assert set(known_methods()) == set(LOSSES) | set(OPTION_METHODS)
    assert unknown_refusals() == []

    monkeypatch.setitem(families.FAMILIES, "nohcp", NoHcP())
    monkeypatch.setattr(families, "NOT_YET", PLANNED)
    row = {ln.split(" | ")[0]: ln for ln in render().splitlines()}
    # columns: the implemented families in registry order (sdxl, sd15, sd3, flux, then the test's), then planned
    assert row["| `model.hcp.enabled=true` (HcP layer)"].endswith(
        "| refused: this family has no UNet cross-attention | not yet |"
    )
    assert row["| `learner.loss=dpo`"].endswith("| works | works | works | works | works | not yet |")
    # a method that runs differently on a family says how
    assert (
        "| works: the scale is FLUX.1-dev's guidance embedding"
        in row["| `rollout.guidance_scale > 1` (classifier-free guidance)"]
    )
    monkeypatch.setattr(NoHcP, "refused", {"hpc": "a typo"})
    assert unknown_refusals() == ["nohcp.hpc"]
