"""The check each family's LoRA file gets: written by the family (``ModelFamily.save_lora``), it loads with the
stock pipeline's ``load_lora_weights`` at its alpha, and the stock pipeline's latents then equal rlfh's sampler
with the same LoRA merged, and differ from the base's."""

from __future__ import annotations

import numpy as np
import torch

from families import add_lora, load_pipeline
from rlfh.config.schema import ModelConfig
from rollouts.sampler import Sampler, seeded_generators
from rollouts.types import SamplerSettings


def assert_lora_loads_in_stock_pipeline(family, model_dir: str, stock, out_dir, lora_b_std: float) -> dict:
    """Train-like LoRA weights (lora_B drawn with std ``lora_b_std``) on ``family``'s targets, saved to
    ``out_dir`` and loaded into ``stock`` (the family's stock pipeline of ``model_dir``); returns the peft state."""
    from peft import get_peft_model_state_dict

    targets = list(family.lora_targets)
    trained = load_pipeline(ModelConfig(path=model_dir))
    denoiser = family.model(trained)
    torch.manual_seed(0)
    add_lora(denoiser, rank=4, alpha=2.0, target_modules=targets)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, lora_b_std)
    state = get_peft_model_state_dict(denoiser)
    family.save_lora(out_dir, state, {"r": 4, "lora_alpha": 2.0, "target_modules": sorted(targets)})

    prompts, seeds = ["a photo of a person", "two people talking"], [5, 6]
    kwargs = dict(prompt=prompts, num_inference_steps=4, guidance_scale=1.0, height=64, width=64, output_type="latent")
    base = stock(**kwargs, generator=seeded_generators(seeds)).images
    stock.load_lora_weights(str(out_dir))
    loaded = stock(**kwargs, generator=seeded_generators(seeds)).images
    ours = Sampler(load_pipeline(ModelConfig(path=model_dir)))
    ours.add_lora(4, 2.0, targets)
    ours.load_lora(state, policy_version=1)
    merged = ours.sample(prompts, seeds, SamplerSettings(4, 1.0, "", 64, 64)).latents
    assert np.abs(loaded.numpy() - base.numpy()).max() > 1e-2
    np.testing.assert_allclose(merged, loaded.numpy(), atol=1e-4, rtol=0)
    return state


def assert_a_dpo_step_moves_the_lora(cfg, lrn) -> None:
    """One DPO step on two pairs of random 64 px latents: a finite loss, and the LoRA moved."""
    import numpy as np
    import torch

    from rlfh.data.batches import ScoredSamples
    from rlfh.data.pairs import learner_batch
    from rlfh.learner.steps import train

    lat = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
    prompts = ["a", "a", "b", "b"]
    batch, _ = learner_batch(
        cfg.learner, ScoredSamples(lat, prompts, prompts, [1.0, 0.0, 0.0, 1.0], [{}] * 4, (64, 64))
    )
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, batch, epochs=1)
    assert np.isfinite(m["loss/dpo"])
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())
