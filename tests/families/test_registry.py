"""The family registry: which adapter a model folder, hub id, single file or tiny id gets, and the
errors for pipeline classes rlfh does not implement (yet)."""

import json

import pytest
import torch

import families
from families import detect_family, get_family


def folder(tmp_path, class_name):
    d = tmp_path / class_name
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return str(d)


# A pipeline rlfh has no adapter for, entered as planned (families.NOT_YET) by the tests that need one.
PLANNED = {"QwenImagePipeline": "qwen_image"}


@pytest.fixture()
def planned(monkeypatch):
    monkeypatch.setattr(families, "NOT_YET", PLANNED)


def test_a_folder_a_tiny_id_and_a_pipeline_get_their_family(tiny_model_dir, tmp_path):
    assert detect_family(tiny_model_dir).name == "sdxl"
    assert detect_family("rlfh:tiny-sdxl").name == "sdxl"
    assert detect_family(folder(tmp_path, "StableDiffusionXLPipeline")) is get_family("sdxl")
    assert detect_family(folder(tmp_path, "StableDiffusionPipeline")) is get_family("sd15")
    assert detect_family("rlfh:tiny-sd15").name == "sd15"
    assert detect_family(folder(tmp_path, "FluxPipeline")) is get_family("flux")


@pytest.mark.parametrize("cls", list(PLANNED))
def test_planned_families_are_refused_by_name(tmp_path, cls, planned):
    with pytest.raises(NotImplementedError, match=f"{cls}.*not implemented yet.*StableDiffusionXLPipeline"):
        detect_family(folder(tmp_path, cls))


def test_unknown_classes_missing_folders_and_unknown_families_are_errors_naming_what_is_known(tmp_path, planned):
    with pytest.raises(
        ValueError,
        match="unknown pipeline class 'KandinskyPipeline'.*FluxPipeline.*QwenImagePipeline.*StableDiffusionXLPipeline",
    ):
        detect_family(folder(tmp_path, "KandinskyPipeline"))
    with pytest.raises(FileNotFoundError, match="no diffusers pipeline there"):
        detect_family(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="single-file checkpoint not found"):
        detect_family(str(tmp_path / "model.safetensors"))
    with pytest.raises(NotImplementedError, match="'qwen_image' is not implemented yet"):
        detect_family("rlfh:tiny-qwen_image")
    with pytest.raises(ValueError, match="unknown model family 'sd2'.*sdxl"):
        get_family("sd2")


def test_single_files_are_told_apart_by_their_keys(tmp_path):
    from safetensors.torch import save_file

    sdxl, flux, other = tmp_path / "sdxl.safetensors", tmp_path / "flux.safetensors", tmp_path / "other.safetensors"
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, str(sdxl))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}, str(sd15))
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(flux))
    save_file({"something.else": torch.zeros(1)}, str(other))
    assert detect_family(str(sdxl)).name == "sdxl"
    assert detect_family(str(sd15)).name == "sd15"
    assert detect_family(str(flux)).name == "flux"
    with pytest.raises(ValueError, match="no key of a known single-file checkpoint"):
        detect_family(str(other))


def test_every_registered_family_implements_the_whole_interface():
    for name, family in families.FAMILIES.items():
        assert family.name == name and not getattr(type(family), "__abstractmethods__", None)
        assert family.pipeline_class not in families.NOT_YET
