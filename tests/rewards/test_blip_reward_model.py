"""The ImageReward architecture: tokenizer, checkpoint key mapping and strict loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rewards.base import RewardError
from rewards.blip_preprocess import VOCAB_PATH, load_blip_tokenizer, tokenize
from rewards.blip_reward_model import (
    VisionSpec,
    export_published_state_dict,
    internal_to_published,
    load_blip_reward_model,
    published_to_internal,
    resolve_model_files,
)
from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = random_model(TINY_VISION, TINY_MED_CONFIG, seed=1)
    return model, save_published(model, TINY_MED_CONFIG, tmp_path_factory.mktemp("ir"), "ImageReward.pt")


def test_tokenizer_matches_blip():
    tok = load_blip_tokenizer()
    assert len(tok) == 30524
    assert tok("A face.").input_ids == [101, 1037, 2227, 1012, 102]
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    ids, mask = tokenize(tok, ["A face.", "word " * 60])
    assert ids.shape == mask.shape == (2, 35)
    assert mask[0].tolist() == [1] * 5 + [0] * 30 and mask[1].sum() == 35 and ids[1, -1] == 102


def test_degenerate_tokenizer_is_loud(tmp_path):
    # What BertTokenizer.from_pretrained("bert-base-uncased") gives offline: 5 special tokens.
    (tmp_path / "bert-base-uncased").mkdir()
    (tmp_path / "bert-base-uncased" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(RewardError, match="5 tokens"):
        load_blip_tokenizer(tokenizer_dir=str(tmp_path / "bert-base-uncased"))
    with pytest.raises(RewardError, match="degenerate"):
        load_blip_tokenizer(vocab_file=str(tmp_path / "bert-base-uncased" / "vocab.txt"))
    with pytest.raises(RewardError, match="not found"):
        load_blip_tokenizer(vocab_file=str(tmp_path / "absent.txt"))
    with pytest.raises(RewardError, match="not a directory"):
        load_blip_tokenizer(tokenizer_dir=str(tmp_path / "absent"))


def test_tokenizer_dir_like_the_reference(tmp_path):
    shutil.copy(VOCAB_PATH, tmp_path / "vocab.txt")
    assert load_blip_tokenizer(tokenizer_dir=str(tmp_path))("A face.").input_ids == [101, 1037, 2227, 1012, 102]


def test_key_mapping_names():
    assert (
        published_to_internal("blip.visual_encoder.blocks.3.attn.qkv.weight")
        == "visual_encoder.encoder.layers.3.self_attn.qkv.weight"
    )
    assert (
        published_to_internal("blip.visual_encoder.blocks.0.attn.proj.bias")
        == "visual_encoder.encoder.layers.0.self_attn.projection.bias"
    )
    assert published_to_internal("blip.visual_encoder.cls_token") == "visual_encoder.embeddings.class_embedding"
    assert published_to_internal("blip.visual_encoder.norm.weight") == "visual_encoder.post_layernorm.weight"
    assert (
        published_to_internal("blip.text_encoder.encoder.layer.2.crossattention.self.key.weight")
        == "text_encoder.encoder.layer.2.crossattention.self.key.weight"
    )
    assert published_to_internal("mlp.layers.7.bias") == "mlp.7.bias"
    assert published_to_internal("mlp.layers.1.weight") is None  # a dropout has no weights
    assert published_to_internal("blip.visual_encoder_m.pos_embed") is None


def test_export_round_trip_and_layout(tiny):
    model, _ = tiny
    state = export_published_state_dict(model)
    families = {k.split(".")[0] + "." + k.split(".")[1] for k in state}
    assert families == {"blip.visual_encoder", "blip.text_encoder", "blip.vision_proj", "blip.text_proj", "mlp.layers"}
    assert {int(k.split(".")[2]) for k in state if k.startswith("mlp.")} == {0, 2, 4, 6, 7}
    for key in model.state_dict():
        assert published_to_internal(internal_to_published(key)) == key
    assert VisionSpec.from_state_dict(state, heads=2) == TINY_VISION
    assert VisionSpec.from_state_dict(state).heads == 1  # default width / 64


def test_load_is_exact(tiny):
    model, directory = tiny
    loaded = load_blip_reward_model(str(directory), "ImageReward.pt", vision_heads=2)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(2, 3, 224, 224)
    ids, mask = tokenize(load_blip_tokenizer(), ["a photo", "A face."])
    assert torch.allclose(loaded(x, ids, mask), model(x, ids, mask), atol=1e-6)
    assert loaded(x, ids, mask).shape == (2,)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("blip.text_encoder.encoder.layer.1.crossattention.self.value.weight"), "missing key"),
        (lambda s: s.__setitem__("blip.visual_encoder_m.pos_embed", torch.zeros(1)), "unknown key"),
        (lambda s: s.__setitem__("mlp.layers.0.weight", torch.zeros(1024, 512)), "checkpoint shape"),
        (lambda s: s.__setitem__("blip.text_encoder.embeddings.position_ids", torch.zeros(1, 64)), "position_ids"),
    ],
)
def test_strict_loading_reports_problems(tiny, tmp_path, edit, message):
    model, directory = tiny
    state = export_published_state_dict(model)
    edit(state)
    torch.save(state, tmp_path / "ImageReward.pt")
    shutil.copy(directory / "med_config.json", tmp_path)
    with pytest.raises(RewardError, match=message):
        load_blip_reward_model(str(tmp_path), "ImageReward.pt", vision_heads=2)


def test_bad_sources(tmp_path):
    with pytest.raises(RewardError, match="lacks"):
        resolve_model_files(str(tmp_path), "FS_model.pt")
    with pytest.raises(RewardError, match="neither a directory nor a hub id"):
        resolve_model_files("not-a-hub-id", "FS_model.pt")
    (tmp_path / "med_config.json").write_text(json.dumps({**TINY_MED_CONFIG, "add_cross_attention": False}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "FS_model.pt")
    with pytest.raises(RewardError, match="image encoder"):
        load_blip_reward_model(str(tmp_path), "FS_model.pt")
    (tmp_path / "FS_model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RewardError, match="weights_only"):
        load_blip_reward_model(str(tmp_path), "FS_model.pt")


def test_hub_id_goes_through_hf_hub_download(tiny, monkeypatch):
    _, directory = tiny
    calls = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None):
        calls.append((repo_id, filename, revision))
        return str(directory / filename)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    weights, med = resolve_model_files("THUDM/ImageReward", "ImageReward.pt", revision="main")
    assert calls == [("THUDM/ImageReward", "ImageReward.pt", "main"), ("THUDM/ImageReward", "med_config.json", "main")]
    assert weights == directory / "ImageReward.pt" and med == directory / "med_config.json"

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RewardError, match="cannot fetch.*no network"):
        resolve_model_files("THUDM/ImageReward", "ImageReward.pt")
