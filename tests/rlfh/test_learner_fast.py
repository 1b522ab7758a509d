"""The learner's speed-ups keep its numbers: prompt embeddings from the batch, the reference by the
LoRA layers' own flag, no one-rank gradient all-reduce, fused/foreach AdamW, torch.compile
(real DeepSpeed engine on CPU, tiny model)."""

import numpy as np
import pytest
import torch

from rlfh.data.batches import PairBatch, SampleBatch
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.steps import train
from tests.conftest import REPO

PROMPTS = ["a photo of a person", "a portrait of a woman", "a man waving his hand", "two people talking"]


def make(tiny_model_dir, *overrides):
    from rlfh.config.schema import load_config

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            "learner.train_batch_size=2",
            "learner.micro_batch_size_per_gpu=1",
            "learner.lr=1e-3",
            *overrides,
        ],
    )
    return LearnerEngine(cfg)


def conditioning_table(pipe, prompts, rows: int = 1):
    """What the rollout actors send, float32 arrays. The encoders' numbers depend on the batch they run
    in (the pooled projection differs by ~4e-7 between 1, 2 and 4 rows on CPU), so by default each
    prompt is encoded as the learner encodes it at micro-batch 1 (each distinct prompt alone);
    ``rows=0``: all prompts in one call, as a sampler batch does."""
    from families import family_of

    distinct, table = sorted(set(prompts)), {}
    for group in [[p] * rows for p in distinct] if rows else [distinct]:
        enc, pooled = family_of(pipe).encode_prompts(pipe, group, "cpu")
        for i, p in enumerate(group):
            table[p] = (enc[i].float().numpy(), pooled[i].float().numpy())
    return table


def pairs(n=4, seed=0, conditioning=None):
    lat = np.random.default_rng(seed).standard_normal((2, n, 4, 8, 8)).astype(np.float32)
    return PairBatch(lat[0], lat[1], [PROMPTS[i % len(PROMPTS)] for i in range(n)], conditioning=conditioning)


def weights(lrn):
    return [p.detach().clone() for p in lrn.trainable_parameters()]


@pytest.mark.slow  # 40-90 s beside another worker (the fast lane stays short)
def test_conditioning_from_the_batch_equals_the_encoded_one_and_drops_the_encoders(tiny_model_dir):
    lrn = make(tiny_model_dir)
    table = conditioning_table(lrn.pipe, PROMPTS)
    prompts = [PROMPTS[i] for i in (2, 2)]
    enc, added = lrn.condition(prompts, 64, 64)  # no table yet: the text encoders
    lrn.conditioning = table
    enc_t, added_t = lrn.condition(prompts, 64, 64)
    assert torch.equal(enc, enc_t)
    assert all(torch.equal(added[k], added_t[k]) for k in added)
    # a sampler batch's encoding (4 prompts in one call) differs only in the encoders' rounding: another
    # batch size, other GEMM blocking. Measured max |diff| (values <= 2.4) of enc / text_embeds: 0 / 3.6e-7
    # (AMD EPYC; OMP_NUM_THREADS=1), 0 / 2.4e-7 (ATEN_CPU_CAPABILITY=default), 3.6e-7 / 0 (MKL_CBWR=COMPATIBLE)
    lrn.conditioning = conditioning_table(lrn.pipe, PROMPTS, rows=0)
    enc_s, added_s = lrn.condition(prompts, 64, 64)
    assert (enc_s - enc).abs().max() <= 1e-6 and (added_s["text_embeds"] - added["text_embeds"]).abs().max() <= 1e-6
    lrn.conditioning = None

    # the same training with and without the batch's conditioning: bit-identical losses and weights
    other = make(tiny_model_dir)
    m_enc = train(lrn, pairs(4), epochs=2)
    m_tab = train(other, pairs(4, conditioning=table), epochs=2)
    assert m_enc["loss/dpo"] == m_tab["loss/dpo"] and m_enc["dpo/implicit_acc"] == m_tab["dpo/implicit_acc"]
    assert all(torch.equal(a, b) for a, b in zip(weights(lrn), weights(other)))
    # online DPO needs no encoder once the rollouts send the embeddings: the learner holds none
    assert lrn.has_text_encoders and not other.has_text_encoders
    assert other.pipe.text_encoder is None and other.pipe.text_encoder_2 is None
    with pytest.raises(RuntimeError, match="dropped its text encoders"):
        train(other, pairs(2, seed=1), epochs=1)  # a later batch without them is refused, by name
    # a weighted-loss batch takes them too
    rwr = make(tiny_model_dir, "learner.loss=rwr")
    lat = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    train(rwr, SampleBatch(lat, PROMPTS[:2], np.ones(2, np.float32), conditioning=table), epochs=1)
    assert not rwr.has_text_encoders


def test_encoders_stay_where_the_run_still_encodes(tiny_model_dir):
    from rlfh.learner.run_config import needs_text_encoders

    lrn = make(tiny_model_dir, "resources.colocate=true")
    assert needs_text_encoders(lrn.cfg)
    train(lrn, pairs(2, conditioning=conditioning_table(lrn.pipe, PROMPTS)), epochs=1)
    assert lrn.has_text_encoders  # the colocated sampler encodes with this pipeline
    partial = make(tiny_model_dir)
    train(partial, pairs(2, conditioning=conditioning_table(partial.pipe, PROMPTS[:1])), epochs=1)
    assert partial.has_text_encoders  # the table lacks a prompt: encoded, encoders kept


def test_reference_flag_equals_disable_adapters_and_leaves_training_state(tiny_model_dir):
    lrn = make(tiny_model_dir)
    assert lrn.lora_layers  # the fast path is the one taken
    train(lrn, pairs(2, seed=3), epochs=1)  # the adapter now moves the policy off the base
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 20])
    enc, added = lrn.condition(PROMPTS[:2], 64, 64)
    with torch.no_grad():
        ref = lrn.reference(x, t, enc, added)
        lrn.denoiser.disable_adapters()
        base = lrn.denoiser(x, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
        lrn.denoiser.enable_adapters()
        policy = lrn.denoiser(x, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
        again = lrn.policy(x, t, enc, added)
    assert torch.equal(ref, base) and not torch.equal(policy, base) and torch.equal(again, policy)
    assert all(p.requires_grad for p in lrn.trainable_parameters())
    assert lrn.trainable_parameters() == [p for p in lrn.denoiser.parameters() if p.requires_grad]


def test_skipping_the_one_rank_allreduce_changes_nothing(tiny_model_dir):
    fast, plain = make(tiny_model_dir, "learner.train_batch_size=4"), make(tiny_model_dir, "learner.train_batch_size=4")
    assert fast.skip_allreduce
    plain.skip_allreduce, plain.engine.enable_backward_allreduce = False, True  # DeepSpeed's own path
    m_fast, m_plain = train(fast, pairs(8), epochs=2), train(plain, pairs(8), epochs=2)
    assert m_fast["loss/dpo"] == m_plain["loss/dpo"]
    assert all(torch.equal(a, b) for a, b in zip(weights(fast), weights(plain)))


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_fused_and_foreach_adamw_match_the_per_tensor_loop(tiny_model_dir, impl):
    from torch.optim import AdamW

    fast, loop = (
        make(tiny_model_dir, f"learner.engine.optimizer_impl={impl}"),
        make(tiny_model_dir, "learner.engine.optimizer_impl=for_loop"),
    )
    inner = lambda lrn: getattr(lrn.optimizer, "optimizer", lrn.optimizer)  # noqa: E731
    assert isinstance(inner(fast), AdamW) and inner(fast).defaults[impl] and not inner(loop).defaults["foreach"]
    start = weights(loop)
    for seed in range(3):  # 3 optimizer steps each
        train(fast, pairs(2, seed=seed), epochs=1)
        train(loop, pairs(2, seed=seed), epochs=1)
    # rounding only: within 1e-6 (a few float32 ulps of weights of size ~1), while the 3 updates at
    # lr 1e-3 moved every tensor by more than 1e-4, a hundred times more
    for a, b, s in zip(weights(fast), weights(loop), start):
        assert (a - b).abs().max() <= 1e-6 and (b - s).abs().max() > 1e-4


@pytest.mark.slow
def test_compiled_unet_trains_like_eager(tiny_model_dir):
    # learner.engine.compile: the same step through inductor's kernels; float rounding differs (fusions), the
    # numbers must not. About a minute of compiling on one CPU core.
    eager, comp = make(tiny_model_dir), make(tiny_model_dir, "learner.engine.compile=true")
    m_e, m_c = train(eager, pairs(2), epochs=2), train(comp, pairs(2), epochs=2)
    assert m_c["loss/dpo"] == pytest.approx(m_e["loss/dpo"], rel=1e-4)
    # Adam's steps move a weight by lr * m / (sqrt(v) + eps): where a gradient is near eps (1e-8) in size, its
    # rounding moves that weight by a visible fraction of lr (1e-3). Measured (AMD EPYC): max 1.77e-5 with 1
    # OpenMP thread, 2.1e-4 of the elements over 1e-6; under 1e-5 with 2 threads. So: a tenth of one step at
    # most, and such elements rare.
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(weights(comp), weights(eager))])
    assert diff.max() <= 1e-4 and (diff > 1e-6).float().mean() <= 1e-3
