"""PickScore, HPSv2 and the LAION aesthetic predictor on tiny random weights in the published layouts."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rewards.aesthetic import AestheticScore
from rewards.base import RewardError
from rewards.blip_preprocess import CLIP_MEAN, CLIP_STD, preprocess_pil
from rewards.clip_common import BPE_PATH, load_clip_tokenizer
from rewards.hpsv2 import HPSv2, convert_open_clip_state_dict, letterbox
from rewards.pickscore import PickScore
from rewards.registry import build_reward
from tests.rewards.tiny_clip import (
    aesthetic_state,
    open_clip_features,
    open_clip_state,
    save_pickscore_dir,
    tiny_hf_clip,
)

PROMPTS = ["a cup of coffee", "a red car on a bridge", "a cup of coffee"]


@pytest.fixture(scope="module")
def images():
    import skimage.data

    coffee = skimage.data.coffee()  # (400, 600, 3): exercises resize + crop / letterbox
    astronaut = skimage.data.astronaut()[:300]  # (300, 512, 3)
    return coffee, astronaut


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


# ---------------------------------------------------------------- CLIP tokenizer


def test_clip_tokenizer_matches_open_clip(tokenizer):
    # Encodings from open_clip 3.3.0's SimpleTokenizer (its tokenize() adds sot/eot).
    assert tokenizer("a cup of coffee").input_ids == [49406, 320, 1937, 539, 2453, 49407]
    assert tokenizer("  Two   people\nshaking HANDS  ").input_ids == [49406, 1237, 1047, 19101, 3500, 49407]
    # open_clip truncation: [sot] + tokens[:75] + [eot], 77 long.
    ids = tokenizer(["cat " * 100], truncation=True, max_length=77).input_ids[0]
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and set(ids[1:-1]) == {2368}


def test_clip_tokenizer_errors(tmp_path):
    with pytest.raises(RewardError, match="not found"):
        load_clip_tokenizer(str(tmp_path / "absent.txt.gz"))
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"#version: 0.2\na b\n"))
    with pytest.raises(RewardError, match="merge lines"):
        load_clip_tokenizer(str(bad))


# ---------------------------------------------------------------- PickScore


@pytest.fixture(scope="module")
def pick_dir(tmp_path_factory):
    return save_pickscore_dir(tmp_path_factory.mktemp("pickscore"), seed=1)


@pytest.fixture(scope="module")
def pickscore(pick_dir):
    return build_reward("pickscore", {"model": str(pick_dir), "processor": str(pick_dir), "batch_size": 2})


def _clip_pil_preprocess(image: np.ndarray) -> torch.Tensor:
    # transformers' CLIPImageProcessor math, written out: PIL bicubic on the shorter side,
    # floor-centered crop, /255, CLIP normalization.
    h, w = image.shape[:2]
    nh, nw = (224, int(224 * w / h)) if h <= w else (int(224 * h / w), 224)
    x = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC), dtype=np.float32)
    top, left = (nh - 224) // 2, (nw - 224) // 2
    x = torch.from_numpy(x[top : top + 224, left : left + 224]).permute(2, 0, 1) / 255
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def test_pickscore_processor_math(pickscore, images):
    type_name = type(pickscore.image_processor).__name__
    assert type_name == "CLIPImageProcessorPil"
    for img in images:
        got = pickscore.image_processor(images=[img], return_tensors="pt").pixel_values[0]
        assert torch.allclose(got, _clip_pil_preprocess(img), atol=1e-6)


def test_pickscore_formula_and_dependence(pickscore, images):
    coffee, astronaut = images
    batch = np.stack([coffee, coffee, coffee])
    a, b, a2 = pickscore(batch, PROMPTS)
    assert pickscore.name == "pickscore" and pickscore.region == "global"
    assert abs(a.value - b.value) > 1e-2  # the prompt matters
    assert a2.value == pytest.approx(a.value, abs=1e-4)  # batching (2, then 1) does not
    other = pickscore(astronaut[None, :, :512].copy(), PROMPTS[:1])[0]
    assert abs(other.value - a.value) > 1e-2  # the image matters
    # Score = exp(logit_scale) * cos, recomputed without the reward's code path.
    m = pickscore.model
    ids = pickscore.tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        e_i = m.visual_projection(m.vision_model(pixel_values=_clip_pil_preprocess(coffee)[None]).pooler_output)
        e_t = m.text_projection(m.text_model(input_ids=ids).pooler_output)
    expected = m.logit_scale.exp() * F.cosine_similarity(e_i, e_t)
    assert a.value == pytest.approx(float(expected), abs=1e-4)
    assert a.info["cosine"] == pytest.approx(a.value / float(m.logit_scale.exp()), abs=1e-9)


def test_pickscore_score_tensor_equals_score_and_has_gradients(pickscore, pick_dir, images):
    """The differentiable path (learner.loss=draft): the processor's steps in torch equal the PIL processor's on
    uint8-valued images (200 x 303 -> 224 x 339: an odd crop margin, where the floor-centred crop differs from
    torchvision's rounding), so the score equals score() within 1e-4 (float summation order), with a pixel
    gradient; CLIPScore, on the same loader, likewise."""
    from rewards.clipscore import CLIPScore

    batch = np.stack([images[0][:200, :303], images[1][:200, :303]])
    prompts = PROMPTS[:2]
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    want = pickscore.image_processor(images=list(batch), return_tensors="pt").pixel_values
    from rewards.pickscore import processor_tensor

    got = torch.stack([processor_tensor(im, pickscore.image_processor) for im in x.detach()])
    assert torch.allclose(got, want, atol=1e-5)
    scores, present = pickscore.score_tensor(x, prompts)
    ref = [r.value for r in pickscore(batch, prompts)]
    assert present.tolist() == [True, True] and torch.allclose(scores.double(), torch.tensor(ref).double(), atol=1e-4)
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.flatten(1).abs().sum(1) > 0).all()
    clip = CLIPScore(model=str(pick_dir), w=100.0, prefix="A photo depicts")
    cs, _ = clip.score_tensor(x.detach(), prompts)
    assert torch.allclose(cs.double(), torch.tensor([r.value for r in clip(batch, prompts)]).double(), atol=1e-4)


def test_pickscore_missing_files(pick_dir, tmp_path):
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(pick_dir, no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (no_tok / name).unlink(missing_ok=True)
    with pytest.raises(RewardError, match="tokenizer"):
        PickScore(model=str(pick_dir), processor=str(no_tok))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(pick_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(RewardError, match="cannot load CLIPModel"):
        PickScore(model=str(no_weights), processor=str(pick_dir))
    with pytest.raises(RewardError, match="neither"):
        PickScore(model=str(tmp_path / "absent"), processor=str(pick_dir))
    # transformers would only log a missing tensor and leave it random; we refuse.
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(pick_dir, partial)
    state = load_file(partial / "model.safetensors")
    del state["text_model.final_layer_norm.weight"]
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RewardError, match="missing.*final_layer_norm"):
        PickScore(model=str(partial), processor=str(pick_dir))


# ---------------------------------------------------------------- HPSv2


@pytest.fixture(scope="module")
def hps_state():
    return open_clip_state(seed=3)


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory, hps_state):
    d = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": hps_state}, d / "HPS_v2.1_compressed.pt")  # the published wrapping
    return d


@pytest.fixture(scope="module")
def hps(hps_dir):
    return build_reward("hpsv2", {"checkpoint": str(hps_dir), "vision_heads": 2, "text_heads": 2, "batch_size": 2})


def test_hps_score_tensor_equals_score_and_has_gradients(hps, images):
    """The differentiable path (learner.loss=draft): the letterbox's own ops from ToTensor on, so the uint8 score
    on uint8-valued images, with a pixel gradient."""
    coffee = images[0][:200, :300]
    (res,) = hps(coffee[None], ["a cup of coffee"])
    x = torch.from_numpy(coffee).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    scores, present = hps.score_tensor(x, ["a cup of coffee"])
    assert present.tolist() == [True] and abs(scores.item() - res.value) < 1e-5
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_hps_letterbox(images):
    coffee, _ = images  # 400 x 600 -> 149 x 224, padded 37 rows on top and 38 below
    x = letterbox(coffee, 224)
    pad = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1)
    assert torch.allclose(x[:, :37].flatten(1), pad.expand(3, 37 * 224).contiguous(), atol=1e-6)
    assert torch.allclose(x[:, 186:].flatten(1), pad.expand(3, 38 * 224).contiguous(), atol=1e-6)
    assert not torch.allclose(x[:, 37], pad.expand(3, 224).contiguous(), atol=1e-3)
    ref = F.interpolate(
        torch.from_numpy(coffee).permute(2, 0, 1)[None].double() / 255,
        size=(149, 224),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )[0]
    ref = (ref - torch.tensor(CLIP_MEAN, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(CLIP_STD).double().view(
        3, 1, 1
    )
    assert torch.allclose(x[:, 37:186].double(), ref, atol=1e-4)  # float32 resize vs float64: ~3e-5
    square = letterbox(coffee[:, :400], 400)  # already at size: normalization only
    assert torch.allclose(
        square,
        (torch.from_numpy(coffee[:, :400]).permute(2, 0, 1) / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1))
        / torch.tensor(CLIP_STD).view(3, 1, 1),
    )


def test_hps_conversion_matches_open_clip_forward(hps, hps_state, images):
    coffee, astronaut = images
    prompts = ["a cup of coffee", "portrait of an astronaut, 8k"]
    pixels = torch.stack([letterbox(coffee, 64), letterbox(astronaut, 64)])
    ids = hps.tokenize(prompts)
    ref_img, ref_txt = open_clip_features(hps_state, pixels, ids, vision_heads=2, text_heads=2)
    with torch.no_grad():
        img = hps.model.get_image_features(pixel_values=pixels)
        txt = hps.model.get_text_features(input_ids=ids)
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    assert torch.allclose(img.double(), ref_img, atol=1e-5, rtol=0)
    assert torch.allclose(txt.double(), ref_txt, atol=1e-5, rtol=0)
    # The reward's value is the cosine of the open_clip features.
    values = [hps(im[None], [p])[0].value for im, p in zip((coffee, astronaut), prompts)]
    assert values == pytest.approx(F.cosine_similarity(ref_img, ref_txt).tolist(), abs=1e-5)
    assert float(hps.model.logit_scale) == pytest.approx(float(hps_state["logit_scale"]))


def test_hps_depends_on_image_and_prompt(hps, images):
    coffee, astronaut = images
    a, b, a2 = hps(np.stack([coffee, coffee, coffee]), PROMPTS)
    c = hps(astronaut[None], PROMPTS[:1])[0]
    assert hps.name == "hpsv2" and hps.region == "global"
    assert abs(a.value - b.value) > 1e-3 and abs(a.value - c.value) > 1e-3
    assert a2.value == pytest.approx(a.value, abs=1e-6)


def test_hps_conversion_table(hps_state):
    conv = convert_open_clip_state_dict(hps_state)
    w = hps_state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(conv["vision_model.encoder.layers.1.self_attn.k_proj.weight"], w[32:64])
    assert torch.equal(conv["visual_projection.weight"], hps_state["visual.proj"].T)
    assert torch.equal(
        conv["text_model.encoder.layers.0.mlp.fc2.bias"], hps_state["transformer.resblocks.0.mlp.c_proj.bias"]
    )
    assert len(conv) == len(hps_state) + 2 * 2 * 2 * 2  # each fused in_proj weight/bias becomes three


def test_hps_errors(hps_dir, hps_state, tmp_path):
    with pytest.raises(RewardError, match="HPS_v2_compressed.pt"):
        HPSv2(checkpoint=str(hps_dir), version="v2.0", vision_heads=2, text_heads=2)
    with pytest.raises(RewardError, match="version"):
        HPSv2(checkpoint=str(hps_dir), version="v3")
    extra = dict(hps_state, **{"visual.attn_pool.query": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pt")  # a bare state dict is accepted, an unknown key is not
    with pytest.raises(RewardError, match="visual.attn_pool.query"):
        HPSv2(checkpoint=str(tmp_path / "extra.pt"), vision_heads=2, text_heads=2)
    partial = {k: v for k, v in hps_state.items() if "resblocks.1.mlp" not in k}
    torch.save({"state_dict": partial}, tmp_path / "partial.pt")
    with pytest.raises(RewardError, match="Missing key"):
        HPSv2(checkpoint=str(tmp_path / "partial.pt"), vision_heads=2, text_heads=2)
    with pytest.raises(RewardError, match="divisible"):
        HPSv2(checkpoint=str(hps_dir), vision_heads=5, text_heads=2)
    with pytest.raises(RewardError, match="CLIP BPE merges file not found"):
        HPSv2(checkpoint=str(hps_dir), bpe_path=str(tmp_path / "none.gz"))
    assert BPE_PATH.is_file()


# ---------------------------------------------------------------- aesthetic predictor


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("aesthetic")
    tiny_hf_clip(seed=5, hidden_act="quick_gelu").save_pretrained(d / "clip")
    state = aesthetic_state(seed=6)
    torch.save(state, d / "sac+logos+ava1-l14-linearMSE.pth")
    return d, state


def test_aesthetic_formula(aesthetic_files, images):
    d, state = aesthetic_files
    reward = build_reward(
        "aesthetic",
        {"mlp_weights": str(d / "sac+logos+ava1-l14-linearMSE.pth"), "clip_model": str(d / "clip"), "batch_size": 2},
    )
    coffee, astronaut = images
    a, b, c = reward(np.stack([coffee, coffee, coffee[::-1].copy()]), ["x", "something else", "x"])
    assert reward.name == "aesthetic" and reward.region == "global"
    assert a.value == pytest.approx(b.value, abs=1e-6)  # the prompt is ignored
    assert abs(a.value - c.value) > 1e-3  # the image is not
    with torch.no_grad():
        clip = reward.clip
        e = clip.visual_projection(clip.vision_model(pixel_values=preprocess_pil(coffee)[None]).pooler_output)
    x = (e / e.norm(dim=-1, keepdim=True)).double()
    for idx in (0, 2, 4, 6, 7):  # affine chain, dropouts off
        x = x @ state[f"layers.{idx}.weight"].double().T + state[f"layers.{idx}.bias"].double()
    assert a.value == pytest.approx(float(x), abs=1e-5)


def test_aesthetic_score_tensor_equals_score_and_has_gradients(aesthetic_files, images):
    """The differentiable path (learner.loss=draft): the uint8 score on uint8-valued images, a pixel gradient."""
    d, _ = aesthetic_files
    reward = build_reward(
        "aesthetic", {"mlp_weights": str(d / "sac+logos+ava1-l14-linearMSE.pth"), "clip_model": str(d / "clip")}
    )
    coffee = images[0][:200, :300]
    (res,) = reward(coffee[None], ["x"])
    x = torch.from_numpy(coffee).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    scores, present = reward.score_tensor(x, ["x"])
    assert present.tolist() == [True] and abs(scores.item() - res.value) < 1e-4
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_aesthetic_errors(aesthetic_files, tmp_path):
    d, state = aesthetic_files
    with pytest.raises(RewardError, match="mlp_weights is required"):
        AestheticScore(clip_model=str(d / "clip"))
    with pytest.raises(RewardError, match="not found"):
        AestheticScore(str(tmp_path / "absent.pth"), clip_model=str(d / "clip"))
    torch.save({"layers.0.weight": state["layers.0.weight"]}, tmp_path / "short.pth")
    with pytest.raises(RewardError, match="does not fit"):
        AestheticScore(str(tmp_path / "short.pth"), clip_model=str(d / "clip"))
    torch.save(aesthetic_state(seed=6, input_size=768), tmp_path / "l14.pth")
    with pytest.raises(RewardError, match="768-d"):
        AestheticScore(str(tmp_path / "l14.pth"), clip_model=str(d / "clip"))
