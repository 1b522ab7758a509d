"""A LoRA trained with alpha != rank loads at the trained strength wherever it is used: the checkpoint
stores alpha in diffusers' adapter metadata, so a stock pipeline (``load_lora_weights``, as ``rlfh
eval`` loads it) samples the same images as the rollout sampler that took the learner's weights."""

import json

import numpy as np
import pytest
import torch

from rlfh.learner.engine import LearnerEngine
from tests.conftest import REPO

RANK, ALPHA = 8, 4.0  # alpha = rank / 2: a file without alpha would load at twice the strength
PROMPTS = ["a photo of a person", "a man waving his hand"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A learner whose LoRA is far from zero (seeded B) and its checkpoint."""
    from rlfh.config.schema import load_config

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [f"model.path={tiny_model_dir}", f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}"],
    )
    lrn = LearnerEngine(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in zip(lrn.trainable_names, lrn.trainable_parameters()):
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    ckpt = tmp_path_factory.mktemp("lora_alpha") / "ckpt"
    lrn.save_checkpoint(ckpt)
    return cfg, lrn, ckpt


def images(pipe, cfg, lora_state=None):
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings

    sampler = Sampler(pipe)
    if lora_state is not None:  # the rollout actor's path: the learner's weights, the config's alpha
        sampler.add_lora(cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules)
        sampler.load_lora(lora_state, 1)
    settings = SamplerSettings(num_inference_steps=4, guidance_scale=1.0, negative_prompt="", height=64, width=64)
    return sampler.sample(PROMPTS, [1, 2], settings).latents


def test_checkpoint_states_alpha(trained):
    from rlfh.run.checkpoints import LORA_FILE, stored_lora_alpha

    _, _, ckpt = trained
    assert stored_lora_alpha(ckpt / LORA_FILE) == ALPHA


def test_stock_pipeline_samples_what_the_sampler_samples(trained):
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import load_file, save_file

    from families import load_pipeline
    from rlfh.run.checkpoints import LORA_FILE, load_lora_into, resolve_lora

    cfg, lrn, ckpt = trained
    sampler_latents = images(load_pipeline(cfg.model), cfg, lrn.lora_state_dict())

    pipe = load_pipeline(cfg.model)
    load_lora_into(pipe, resolve_lora(ckpt))  # what rlfh eval and region-pairs do
    stock_latents = images(pipe, cfg)
    # merged (sampler) vs unmerged (diffusers) LoRA: equal within float32 rounding
    np.testing.assert_allclose(stock_latents, sampler_latents, atol=2e-4)
    pipe.unload_lora_weights()
    lora_effect = np.abs(sampler_latents - images(pipe, cfg)).max()
    assert lora_effect > 0.05, lora_effect

    # the same weights without the stored alpha (the old file) load at alpha = rank: visibly off
    old = ckpt.parent / "old"
    old.mkdir()
    save_file(load_file(ckpt / LORA_FILE), old / LORA_FILE, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="stores no LoRA alpha"):
        load_lora_into(pipe, resolve_lora(old))
    off = np.abs(images(pipe, cfg) - sampler_latents).max()
    assert off > 0.1 * lora_effect, (off, lora_effect)
    from safetensors import safe_open

    with safe_open(str(ckpt / LORA_FILE), framework="pt") as f:
        assert json.loads(f.metadata()[LORA_ADAPTER_METADATA_KEY])["unet.lora_alpha"] == ALPHA
