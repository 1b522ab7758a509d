"""The config rule that reads the model family (rlfh/config/rules.py: family_rules): a family rlfh does not
implement, a model.family that disagrees with model.path, and a method a family does not apply are refused
before anything starts, each with its reason. No model is loaded: `rlfh:tiny-<family>` names its family."""

import json

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


@pytest.mark.parametrize("cls", ["FluxPipeline"])
def test_families_not_implemented_yet_are_refused_with_the_reason(tmp_path, cls):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    with pytest.raises(ConfigError, match=f"{cls}.*not implemented yet.*StableDiffusionPipeline"):
        config(f"model.path={tmp_path}")
    with pytest.raises(ConfigError, match="model.family=flux: model family 'flux' is not implemented yet"):
        config("model.family=flux")


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
