"""Per-region losses and the MPD rule inside the DeepSpeed engine (gloo, one process)."""

import numpy as np
import pytest
import torch

from rewards.base import Detection
from rlfh.data.batches import PairBatch, SampleBatch, ScoredSamples
from rlfh.data.pairs import learner_batch, region_mask_arrays
from rlfh.learner.engine import LearnerEngine
from rlfh.learner.steps import train, update
from rlfh.losses import fairness
from tests.conftest import REPO


def make(tiny_model_dir, *overrides):
    from rlfh.config.schema import load_config

    return LearnerEngine(load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", *overrides]))


@pytest.fixture(scope="module")
def mpd_learner(tiny_model_dir):
    return make(
        tiny_model_dir,
        "learner.regions.names=[global, face, hand]",
        "learner.train_batch_size=2",
        "learner.micro_batch_size_per_gpu=1",
        "learner.regions.fairness.rule=mpd",
    )


def test_engine_gradient_is_the_mpd_combination(mpd_learner):
    lrn = mpd_learner
    params = [p for p in lrn.denoiser.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    dirs = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(2)]
    objectives = {n: sum((p * d).sum() for p, d in zip(params, dd)) ** 2 for n, dd in zip(["global", "face"], dirs)}
    grads = fairness.objective_gradients(list(objectives.values()), params)
    gram = fairness.gram_matrix(grads)
    # K = 3: the run trains global, face and hand, the hand absent from this micro-batch (FairGrad's n_tasks)
    expected_w = fairness.combine_weights(gram, "mpd", alpha=2.0, num_objectives=3)
    lrn.engine.zero_grad()
    metrics = update(lrn, dict(objectives), {}, pred=None)  # first micro-step: no optimizer step yet
    c = expected_w.coefficients
    assert metrics["fairness/coef/global"] == pytest.approx(float(c[0])) and "fairness/coef/hand" not in metrics
    gas = lrn.cfg.gradient_accumulation_steps  # DeepSpeed scales each micro-batch's loss by 1/GAS
    for i, p in enumerate(params[:20]):
        want = (float(c[0]) * grads[0][i] + float(c[1]) * grads[1][i]) / gas
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)
    # the weights solve the MPD equation (G^T G w)_i = w_i^(-1/2)
    w = expected_w.weights
    torch.testing.assert_close(gram @ w, w.pow(-0.5), rtol=1e-6, atol=0)
    update(lrn, dict((n, o.detach().requires_grad_()) for n, o in objectives.items()), {}, pred=None)


def test_regions_from_detections_train_end_to_end(mpd_learner):
    rng = np.random.default_rng(0)
    n = 8
    latents = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    prompts = [f"p{i // 2}" for i in range(n)]  # 4 prompt groups of 2
    scores = [float(s) for s in rng.standard_normal(n)]
    face = [Detection((8.0, 8.0, 30.0, 30.0), 0.95)]
    regions = [{"face": face} if i < 4 else {} for i in range(n)]  # only the first two groups have faces
    batch, stats = learner_batch(
        mpd_learner.cfg.learner, ScoredSamples(latents, prompts, prompts, scores, regions, (64, 64))
    )
    assert isinstance(batch, PairBatch) and stats["pairs/count"] == 4
    assert batch.masks_w["face"].shape == (4, 1, 8, 8) and batch.masks_w["hand"].max() == 0
    m = train(mpd_learner, batch, epochs=1)
    assert np.isfinite(m["loss/dpo/global"]) and np.isfinite(m["loss/dpo/face"])
    assert m["regions/hand/present"] == 0.0 and 0.0 < m["regions/face/present"] <= 1.0
    assert "mpd/weight/face" in m and "mpd/weight/hand" not in m


def test_region_masks_follow_fairhuman(tiny_model_dir):
    m = region_mask_arrays([{"face": [Detection((8.0, 8.0, 16.0, 16.0), 0.9)]}, {}], ["global", "face"], (64, 64))
    assert set(m) == {"face"} and m["face"].shape == (2, 1, 8, 8)
    assert m["face"][1].max() == 0 and m["face"][0].sum() > 1  # dilated 16x16 before the resize


@pytest.mark.parametrize("loss", ["rwr", "filtered"])
def test_weighted_losses_train(tiny_model_dir, loss):
    lrn = make(
        tiny_model_dir, f"learner.loss={loss}", "learner.train_batch_size=4", "learner.micro_batch_size_per_gpu=2"
    )
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((8, 4, 8, 8)).astype(np.float32)
    scores = [float(s) for s in rng.standard_normal(8)]
    batch, stats = learner_batch(
        lrn.cfg.learner, ScoredSamples(latents, ["p"] * 8, ["p"] * 8, scores, [{}] * 8, (64, 64))
    )
    assert isinstance(batch, SampleBatch)
    if loss == "filtered":
        assert stats["samples/kept"] == 4  # top half
    else:
        assert batch.weights.mean() == pytest.approx(1.0)
        assert np.argmax(batch.weights) == int(np.argmax(scores))
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, batch, epochs=1)
    assert np.isfinite(m[f"loss/{loss}"]) and lrn.global_step >= 1
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())
    with pytest.raises(ValueError, match="trains on weighted samples"):
        train(lrn, PairBatch(latents[:2], latents[2:4], ["p", "p"]))


def test_mpd_under_zero2(tiny_model_dir):
    lrn = make(
        tiny_model_dir,
        "learner.regions.names=[global, face]",
        "learner.engine.zero_stage=2",
        "learner.train_batch_size=2",
        "learner.micro_batch_size_per_gpu=2",
    )
    rng = np.random.default_rng(2)
    lat = rng.standard_normal((2, 2, 4, 8, 8)).astype(np.float32)
    face = region_mask_arrays([{"face": [Detection((0.0, 0.0, 20.0, 20.0), 0.99)]}] * 2, ["face"], (64, 64))["face"]
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    m = train(lrn, PairBatch(lat[0], lat[1], ["p", "q"], {"face": face}, {"face": face}), epochs=1)
    assert np.isfinite(m["loss/dpo/face"]) and m["mpd/weight/face"] > 0 and m["mpd/weight/global"] > 0
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())
