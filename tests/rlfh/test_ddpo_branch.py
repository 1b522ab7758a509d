"""DDPO trajectory branching (learner.ddpo.branch; TempFlow-GRPO, arXiv 2508.04324): a prompt group's
samples share x_T and the deterministic DDIM prefix before the SDE window, sampled once per group,
and branch at the window with their own noise."""

import numpy as np
import pytest
import torch

from families import load_pipeline
from rlfh.config.schema import ConfigError, load_config
from rlfh.data.pairs import ddpo_branch_seeds
from rollouts.actor import sample_in_batches
from rollouts.sampler import Sampler
from rollouts.types import SamplerSettings, SDEWindow
from tests.conftest import REPO

DDPO = ["learner.loss=ddpo", "rollout.scheduler=ddim", "rollout.eta=1.0", "rollout.num_inference_steps=4"]
ST = SamplerSettings(4, 3.0, "", 64, 64, 1.0, "ddim")  # guided: the prefix batches carry the negative rows too
PROMPTS, SEEDS = ["a", "a", "a", "b", "b"], [11, 12, 13, 21, 22]


@pytest.fixture(scope="module")
def sampler(tiny_model_dir):
    return Sampler(
        load_pipeline(load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}"]).model),
        scheduler="ddim",
    )


class UNetRows:
    """Counts the rows of every UNet forward (CFG doubles them)."""

    def __init__(self, unet):
        self.denoiser, self.rows = unet, []
        self.forward = unet.forward

    def __enter__(self):
        def counted(x, *a, **k):
            self.rows.append(x.shape[0])
            return self.forward(x, *a, **k)

        self.denoiser.forward = counted
        return self

    def __exit__(self, *exc):
        self.denoiser.forward = self.forward


def test_branch_seeds_are_each_groups_first_seed_and_need_a_window(tiny_model_dir):
    base = [f"model.path={tiny_model_dir}", *DDPO]
    on = load_config(REPO / "configs" / "tiny.yaml", [*base, "learner.ddpo.window=2", "learner.ddpo.branch=true"])
    assert ddpo_branch_seeds(on, ["a", "b", "a", "b"], [5, 6, 7, 8]) == [5, 6, 5, 6]
    assert (
        ddpo_branch_seeds(
            load_config(REPO / "configs" / "tiny.yaml", [*base, "learner.ddpo.window=2"]), ["a", "b"], [5, 6]
        )
        is None
    )
    with pytest.raises(
        ConfigError, match="learner.ddpo.branch=true .* needs learner.loss=ddpo and learner.ddpo.window"
    ):
        load_config(REPO / "configs" / "tiny.yaml", [*base, "learner.ddpo.branch=true"])
    with pytest.raises(ConfigError, match="learner.ddpo.branch"):
        load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", "learner.ddpo.branch=true"])


def test_group_shares_the_prefix_once_then_branches(sampler):
    window = SDEWindow(2, 1)
    branch = [11, 11, 11, 21, 21]
    with UNetRows(sampler.pipe.unet) as counted:
        out = sampler.sample(PROMPTS, SEEDS, ST, record=window, branch_seeds=branch)
    # steps 0, 1 and the window's input x_2 run once per group (2 groups x 2 CFG rows), the last step once per sample
    assert counted.rows == [4, 4, 4, 10]
    tr = out.trajectory
    xj = tr["latents"][:, 0]
    for group in ([0, 1, 2], [3, 4]):
        for k in group[1:]:
            np.testing.assert_array_equal(xj[k], xj[group[0]])  # x_j bit for bit
            assert np.abs(out.latents[k] - out.latents[group[0]]).mean() > 1e-3  # branched at the window
            assert tr["log_probs"][k, 0] != tr["log_probs"][group[0], 0]
    assert np.abs(xj[0] - xj[3]).mean() > 1e-2  # the groups differ (prompt and x_T)


@pytest.mark.parametrize("start", [0, 1])
def test_branched_equals_the_unbranched_window_sampler_from_the_groups_x_T(sampler, monkeypatch, start):
    """Each branch is what the unbranched window sampler gives from its group's x_T and its own window noise."""
    window = SDEWindow(start, 2)
    branch = [11, 11, 11, 21, 21]
    out = sampler.sample(PROMPTS, SEEDS, ST, record=window, branch_seeds=branch)
    # the unbranched sampler with x_T replaced by the group's: each generator still draws its own x_T
    # first (so the window noise is the sample's own), and the returned rows are the groups'
    pipe = sampler.pipe
    original = pipe.prepare_latents

    def group_x_T(b, *args):
        original(b, *args)  # advances every sample's generator past its own x_T
        *head, _ = args
        return torch.cat([original(1, *head, [torch.Generator().manual_seed(s)]) for s in branch])

    monkeypatch.setattr(pipe, "prepare_latents", group_x_T)
    ref = sampler.sample(PROMPTS, SEEDS, ST, record=window)
    # the prefix ran on 2 rows here and 5 there: equal up to the UNet's batch-size-dependent rounding
    np.testing.assert_allclose(out.trajectory["latents"], ref.trajectory["latents"], atol=1e-5)
    np.testing.assert_allclose(out.latents, ref.latents, atol=1e-5)
    # and given the same x_j (the branched run's, handed over at the prefix's last deterministic step)
    # the window's latents and log-probs and the sample are the unbranched sampler's, up to the UNet's
    # batch-size-dependent rounding of the eps at x_j (once per group here, per sample there; with
    # more than one thread the two round differently, by ~5e-6)
    step, calls = pipe.scheduler.step, []

    def same_x_j(eps, t, x, **kw):
        calls.append(t)
        out_x = step(eps, t, x, **kw)
        if len(calls) == window.start:
            return (torch.as_tensor(out.trajectory["latents"][:, 0]).to(out_x[0]),)
        return out_x

    monkeypatch.setattr(pipe.scheduler, "step", same_x_j)
    ref = sampler.sample(PROMPTS, SEEDS, ST, record=window)
    monkeypatch.undo()
    assert len(calls) == 4 - window.size  # every step outside the window went through the patch
    for key in ("timesteps", "window_start"):
        np.testing.assert_array_equal(out.trajectory[key], ref.trajectory[key], err_msg=key)
    for key in ("latents", "log_probs"):
        np.testing.assert_allclose(out.trajectory[key], ref.trajectory[key], rtol=1e-4, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(out.latents, ref.latents, atol=1e-5)
    assert np.abs(out.images.astype(int) - ref.images.astype(int)).max() <= 1
    # a group's first sample (branch seed = its seed) is the plain unbranched sample (same rounding caveat)
    plain = sampler.sample(PROMPTS, SEEDS, ST, record=window)
    for k in (0, 3):
        np.testing.assert_allclose(out.trajectory["latents"][k], plain.trajectory["latents"][k], atol=1e-5)
        np.testing.assert_allclose(out.latents[k], plain.latents[k], atol=1e-5)
    assert np.abs(out.latents[1] - plain.latents[1]).max() > 1e-2  # and the others are not


def test_branching_is_split_invariant_and_off_changes_nothing(sampler):
    window = SDEWindow(2, 1)
    branch = [11, 11, 11, 21, 21]
    whole = sampler.sample(PROMPTS, SEEDS, ST, record=window, branch_seeds=branch)
    # batches of 2 cut group "a": its x_T is still the one of seed 11, whatever the batch holds. The UNet's
    # float32 rounding depends on the batch's size (the unbranched sampler's samples move by ~5e-6 between
    # batch sizes too), so the split leaves the samples equal to that rounding, not bit for bit.
    split = sample_in_batches(sampler, PROMPTS, SEEDS, ST, 2, window, branch)
    np.testing.assert_allclose(split.trajectory["latents"], whole.trajectory["latents"], atol=1e-4)
    np.testing.assert_allclose(split.latents, whole.latents, atol=1e-4)
    other = sampler.sample(PROMPTS, SEEDS, ST, record=window, branch_seeds=[11, 11, 12, 21, 21])
    assert np.abs(other.latents[2] - whole.latents[2]).mean() > 1e-2  # the tolerance tells x_T's apart
    # without branch seeds the call is today's: every sample from its own x_T
    off = sample_in_batches(sampler, PROMPTS, SEEDS, ST, 5, window)
    np.testing.assert_array_equal(off.latents, sampler.sample(PROMPTS, SEEDS, ST, record=window).latents)
    assert np.abs(off.trajectory["latents"][1, 0] - off.trajectory["latents"][0, 0]).mean() > 1e-2
    with pytest.raises(ValueError, match="record=SDEWindow"):
        sampler.sample(PROMPTS, SEEDS, ST, branch_seeds=branch)


@pytest.mark.slow
def test_fleet_branches_groups_cut_between_actors_and_reissues_the_same_images(ray_local, tiny_cfg):
    """Two rollout actors get shares of 2 and 3 samples, so group "a" is cut between them: each share
    starts it from seed 11's x_T, and a share sent again (as after an actor's death) gives the same images."""
    from rollouts.actor import RolloutActor, RolloutFleet

    ray = ray_local
    cfg = tiny_cfg()
    sampler = Sampler(load_pipeline(cfg.model), scheduler="ddim")
    window, branch = SDEWindow(2, 1), [11, 11, 11, 21, 21]
    want = sampler.sample(PROMPTS, SEEDS, ST, record=window, branch_seeds=branch)
    actors = [RolloutActor.options(num_cpus=0.5).remote(cfg.model, cfg.model.lora, scheduler="ddim") for _ in range(2)]
    try:
        fleet = RolloutFleet(actors, 0)
        got = fleet.sample(PROMPTS, SEEDS, ST, 8, window, branch)
        assert got.prompts == PROMPTS and got.seeds == SEEDS
        np.testing.assert_allclose(got.trajectory["latents"], want.trajectory["latents"], atol=1e-4)
        np.testing.assert_allclose(got.latents, want.latents, atol=1e-4)
        again = fleet.sample(PROMPTS, SEEDS, ST, 8, window, branch)
        np.testing.assert_array_equal(again.images, got.images)
        np.testing.assert_array_equal(again.trajectory["log_probs"], got.trajectory["log_probs"])
    finally:
        for a in actors:
            ray.kill(a)


def test_learner_runs_a_groups_shared_x_j_once_with_the_same_update(tiny_model_dir, sampler):
    """learner.ddpo.branch: the window's first step trains one UNet row per distinct (prompt, x_j) of a
    micro-batch; the update equals the one that runs every row (the gradient sums over the copies)."""
    from rlfh.data.batches import ScoredSamples
    from rlfh.data.pairs import learner_batch
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train

    base = [
        f"model.path={tiny_model_dir}",
        *DDPO,
        "rollout.guidance_scale=3.0",
        "learner.ddpo.window=2",
        "learner.train_batch_size=4",
        "learner.micro_batch_size_per_gpu=4",
        "learner.lr=1e-3",
    ]
    st = SamplerSettings(4, 3.0, "", 64, 64, 1.0, "ddim")
    prompts, seeds = ["p", "p", "q", "q"], [1, 2, 3, 4]
    b = sampler.sample(prompts, seeds, st, record=SDEWindow(1, 2), branch_seeds=[1, 1, 3, 3])
    updated, counts = [], []
    for branch in ("false", "true"):
        cfg = load_config(REPO / "configs" / "tiny.yaml", [*base, f"learner.ddpo.branch={branch}"])
        batch, _ = learner_batch(
            cfg.learner,
            ScoredSamples(b.latents, prompts, prompts, [1.0, 0.0, 0.5, 2.0], [{}] * 4, (64, 64), b.trajectory, st),
        )
        lrn = LearnerEngine(cfg)
        with UNetRows(lrn.denoiser) as counted:
            m = train(lrn, batch, epochs=1)
        assert m["ddpo/recorded_logprob_max_diff"] < 1e-5
        updated.append(lrn.lora_state_dict())
        counts.append(sorted(counted.rows))
    assert counts == [[8, 8], [4, 8]]  # (2 CFG rows each) 4 samples at both steps; 2 groups at the first
    # Adam's first step moves each weight by ~lr = 1e-3: equal to 1% of it (the rounding of a sum over
    # copies instead of over rows, which Adam's normalization magnifies where a gradient is tiny)
    for k in updated[0]:
        torch.testing.assert_close(updated[1][k], updated[0][k], rtol=0, atol=1e-5)
    assert max(float(v.abs().max()) for k, v in updated[1].items() if "lora_B" in k) > 5e-4
