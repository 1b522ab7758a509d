"""Sampler.refine: SDEdit (img2img) against diffusers' own SDXL img2img pipeline, and inpainting's
promise that nothing outside the mask changes."""

import numpy as np
import pytest
import torch

from families import load_pipeline
from rlfh.config.schema import ModelConfig
from rollouts.sampler import Sampler, seeded_generators
from rollouts.types import SamplerSettings


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(ModelConfig(path=tiny_model_dir))


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_refine_equals_stock_diffusers_img2img(pipe, guidance):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    prompts, seeds = ["a photo of a person", "a man waving his hand"], [3, 1]
    settings = SamplerSettings(10, guidance, "blurry", 64, 64)
    sampler = Sampler(pipe, "tiny")
    x0 = sampler.sample(prompts, [7, 8], settings).latents
    ours = sampler.refine(x0, prompts, seeds, settings, strength=0.4)
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    # a 4-channel `image` is taken as latents as they are (no VAE, no scaling)
    ref = img2img(
        prompt=prompts,
        negative_prompt=["blurry"] * 2,
        image=torch.from_numpy(x0),
        strength=0.4,
        num_inference_steps=10,
        guidance_scale=guidance,
        generator=seeded_generators(seeds),
        output_type="latent",
    ).images
    np.testing.assert_allclose(ours.latents, ref.numpy(), atol=1e-5)
    assert not np.allclose(ours.latents, x0, atol=1e-3)


def test_inpainting_changes_only_inside_the_mask(pipe):
    settings = SamplerSettings(10, 1.0, "", 64, 64)
    sampler = Sampler(pipe, "tiny")
    x0 = sampler.sample(["a photo of a person"] * 2, [7, 8], settings).latents
    masks = np.zeros((2, 1, 8, 8), np.float32)
    masks[:, :, 2:5, 3:7] = 1.0
    out = sampler.refine(x0, ["a photo of a person"] * 2, [1, 2], settings, strength=0.5, masks=masks)
    outside = masks == 0
    np.testing.assert_array_equal(
        np.broadcast_to(outside, x0.shape) * out.latents, np.broadcast_to(outside, x0.shape) * x0
    )
    inside = np.broadcast_to(masks == 1, x0.shape)
    assert np.abs(out.latents[inside] - x0[inside]).mean() > 1e-3


def test_refine_refuses_what_runs_no_step(pipe):
    settings = SamplerSettings(4, 1.0, "", 64, 64)
    sampler = Sampler(pipe, "tiny")
    x0 = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="runs no step"):
        sampler.refine(x0, ["p"], [0], settings, strength=0.1)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        sampler.refine(x0, ["p"], [0], settings, strength=1.5)
    with pytest.raises(ValueError, match="masks must be"):
        sampler.refine(x0, ["p"], [0], settings, strength=0.5, masks=np.ones((1, 8, 8), np.float32))
