"""`rlfh eval` and `rlfh make-region-pairs` on the tiny SD3 model: the evaluation compares an SD3 LoRA with
the base model; the region pairs are inpainted by the policy with masked SDEdit re-noised along the flow
schedule (``FlowFamily.renoise``); a diffusers inpainting pipeline of a flow model is refused with the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlfh.config.schema import load_config
from tests.conftest import REPO
from tests.rlfh.eval_helpers import PROMPTS, SEEDS, eval_overrides, make_lora
from tests.rlfh.test_region_pairs_tiny import assert_inpainted_only_in_the_mask, overrides, records_by_role


@pytest.fixture(scope="module")
def face_images(tmp_path_factory):
    from tests.rlfh.test_region_pairs_tiny import write_face_images

    return write_face_images(tmp_path_factory.mktemp("images"))


def test_eval_compares_an_sd3_lora_with_the_base_model(tiny_sd3_dir, tmp_path):
    """`rlfh eval` on SD3: both sides sampled by the SD3 pipeline at the same seeds, the LoRA changing the
    images but not beyond recognition, every sample scored."""
    from PIL import Image

    from rlfh.cli.main import main

    lora = make_lora(tiny_sd3_dir, tmp_path / "lora")
    out, prompts = tmp_path / "eval", tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["eval", "configs/tiny.yaml", *eval_overrides(tiny_sd3_dir), "--model", tiny_sd3_dir, "--lora", str(lora)]
    args += ["--baseline-model", tiny_sd3_dir, "--prompts", str(prompts), "--out", str(out)]
    args += ["--seeds", str(len(SEEDS)), "--seed-start", str(SEEDS[0]), "--no-report", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "eval.json").read_text())
    n = len(PROMPTS) * len(SEEDS)
    for side in ("model", "baseline"):
        assert summary["rewards"]["jpeg_compressibility"][side]["n_valid"] == n
    a = np.asarray(Image.open(out / "images" / "model" / "0000.png"), dtype=float)
    b = np.asarray(Image.open(out / "images" / "baseline" / "0000.png"), dtype=float)
    assert 0 < np.abs(a - b).mean() < 40


def test_make_region_pairs_on_sd3_inpaints_inside_the_mask_only(face_images, tiny_sd3_dir, tmp_path):
    from rlfh.recipes.region_pairs import make_region_pairs

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        overrides(tiny_sd3_dir, tmp_path / "run", "data.region_pairs.strength=0.4", "rollout.num_inference_steps=5"),
    )
    log_dir, counts = make_region_pairs(cfg, str(face_images))
    assert counts["with_region"] == 6
    pairs, decode_latent = records_by_role(log_dir)
    assert len(pairs) == 6 and all(inp["model_id"] == tiny_sd3_dir for _, inp in pairs)
    assert_inpainted_only_in_the_mask(pairs, decode_latent, 0.4)


def test_a_flow_models_inpainting_pipeline_is_refused(face_images, tiny_sd3_dir, tmp_path):
    from rlfh.recipes.region_pairs import make_region_pairs

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        overrides(tiny_sd3_dir, tmp_path / "run", f"data.region_pairs.pipeline={tiny_sd3_dir}"),
    )
    with pytest.raises(ValueError, match=r"data.region_pairs.pipeline=.*sd3 \(StableDiffusion3Pipeline\).*refine"):
        make_region_pairs(cfg, str(face_images))
