"""Direct reward fine-tuning (learner.loss=draft, rlfh/losses/draft.py): which steps carry the gradient in each
variant, on a toy chain whose gradients are worked out by hand; the per-region objectives; the refusal of a
reward that is not differentiable; and the reward rising on the tiny model (rlfh/learner/draft_steps.py)."""

import contextlib
import math

import numpy as np
import pytest
import torch

from rlfh.config.schema import ConfigError, load_config
from rlfh.losses.draft import (
    DraftConfig,
    ScoredRegion,
    Step,
    first_grad_step,
    refl_steps,
    region_objectives,
    scored_latents,
)
from tests.conftest import REPO

# The toy chain: scalar latents, one parameter theta_i per step, eps_i = theta_i x_i and a DDIM-like step
#   x_{i+1} = c_i x_i + d_i eps_i,   x0_i = (x_i - b_i eps_i) / a_i
# so the reward r = x_n (or x0_j) has d r / d theta_i by hand.
C = [0.9, 0.8, 0.7, 0.6]
D = [0.5, 0.4, 0.3, 0.2]
A = [0.2, 0.4, 0.6, 0.8]
B = [math.sqrt(1 - a * a) for a in A]
THETA0 = [1.5, -0.5, 2.0, 0.25]


def toy(kl: bool = False):
    theta = torch.nn.Parameter(torch.tensor(THETA0, dtype=torch.float64))

    def step(x, i):
        eps = theta[i] * x
        kl_i = (eps - 0.0 * x).pow(2).mean() if kl and torch.is_grad_enabled() else None
        return Step(C[i] * x + D[i] * eps, (x - B[i] * eps) / A[i], kl_i)

    return theta, step


def forward_values(x0: float, n: int) -> list[float]:
    xs = [x0]
    for i in range(n):
        xs.append((C[i] + D[i] * THETA0[i]) * xs[-1])
    return xs


def grads_of(cfg: DraftConfig, seed: int = 0, abar_last: float = 0.64, x_T: float = 1.0):
    theta, step = toy()
    x, _, metrics = scored_latents(
        cfg, torch.tensor([[x_T]], dtype=torch.float64), 4, step, abar_last, torch.Generator().manual_seed(seed)
    )
    x.mean().backward()
    return theta.grad.tolist(), metrics


@pytest.mark.parametrize("checkpoint", [False, True])
def test_draft_k_gradient_reaches_the_last_k_steps_only(checkpoint):
    g, m = grads_of(DraftConfig("draft_k", k=2, checkpoint=checkpoint))
    xs = forward_values(1.0, 4)
    # r = x_4 = (c_3 + d_3 th_3) x_3, x_3 = (c_2 + d_2 th_2) x_2; x_2 is a constant (stop-gradient)
    assert g[0] == 0.0 and g[1] == 0.0
    assert g[3] == pytest.approx(D[3] * xs[3], rel=1e-12)  # 0.2 * x_3
    assert g[2] == pytest.approx(D[2] * xs[2] * (C[3] + D[3] * THETA0[3]), rel=1e-12)
    assert m == {"draft/first_grad_step": 2.0, "draft/grad_steps": 2.0}
    # worked numbers: x = 1, 1.65, 0.99, 1.287, 0.83655; g_2 = 0.3 * 0.99 * 0.65, g_3 = 0.2 * 1.287
    assert g[2] == pytest.approx(0.19305) and g[3] == pytest.approx(0.2574)


def test_draft_k_larger_than_the_chain_trains_every_step():
    g, m = grads_of(DraftConfig("draft_k", k=9))
    assert all(v != 0.0 for v in g) and m["draft/first_grad_step"] == 0.0


def test_alignprop_truncation_is_drawn_per_call_and_gradient_stops_there():
    cfg = DraftConfig("alignprop", k_range=[1, 3])
    for seed in range(6):
        g, m = grads_of(cfg, seed)
        k = int(torch.randint(1, 4, (1,), generator=torch.Generator().manual_seed(seed)))  # the draw, redone
        start = 4 - k
        assert m["draft/first_grad_step"] == start and m["draft/grad_steps"] == k
        assert all(v == 0.0 for v in g[:start]) and all(v != 0.0 for v in g[start:])
    draws = {first_grad_step(cfg, 4, torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {1, 2, 3}  # K' in {1, 2, 3}: the truncation point moves


def test_refl_scores_the_x0_prediction_of_one_late_step():
    cfg = DraftConfig("refl", refl_range=[0.5, 1.0])  # of 4 steps: j in {2, 3}
    seen = set()
    for seed in range(8):
        g, m = grads_of(cfg, seed)
        j = int(m["draft/first_grad_step"])
        seen.add(j)
        x_j = forward_values(1.0, 4)[j]
        # r = x0_j = (x_j - b_j th_j x_j) / a_j, x_j a constant: d r / d th_j = -b_j x_j / a_j, nothing else
        assert g[j] == pytest.approx(-B[j] * x_j / A[j], rel=1e-12)
        assert all(v == 0.0 for i, v in enumerate(g) if i != j)
    assert seen == {2, 3}


def test_refl_step_range_as_imagereward_draws_it():
    assert refl_steps([0.75, 1.0], 40) == (30, 39)  # ImageReward: 40 steps, t in [30, 40)
    assert refl_steps([0.75, 1.0], 4) == (3, 3)
    assert refl_steps([0.5, 0.8], 10) == (5, 7)
    assert refl_steps([0.0, 0.01], 4) == (0, 0)


def test_draft_lv_averages_the_last_step_over_renoised_copies():
    cfg = DraftConfig("draft_lv", lv_n=3)
    abar = 0.64
    g, m = grads_of(cfg, seed=5, abar_last=abar)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn((3, 1, 1), generator=gen).double()  # the draws scored_latents makes (float32)
    x_n = forward_values(1.0, 4)[4]
    x_prev = [math.sqrt(abar) * x_n + math.sqrt(1 - abar) * float(e) for e in noise.flatten()]
    # r = mean_j (c_3 + d_3 th_3) x_3^(j): only the last step's parameter, d_3 times the copies' mean
    assert g[:3] == [0.0, 0.0, 0.0]
    assert g[3] == pytest.approx(D[3] * np.mean(x_prev), rel=1e-12)
    assert m["draft/grad_steps"] == 1.0


def test_kl_is_taken_at_the_steps_with_gradient_only():
    theta, step = toy(kl=True)
    x = torch.tensor([[1.0]], dtype=torch.float64)
    _, kl, _ = scored_latents(DraftConfig("draft_k", k=2), x, 4, step, 0.5, torch.Generator())
    xs = forward_values(1.0, 4)
    # the mean over steps 2 and 3 of eps_i^2 = (th_i x_i)^2 (the toy's reference predicts 0)
    assert float(kl.detach()) == pytest.approx(((THETA0[2] * xs[2]) ** 2 + (THETA0[3] * xs[3]) ** 2) / 2, rel=1e-12)


def test_region_objectives_weigh_rewards_and_average_where_present():
    s1 = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    s2 = torch.tensor([10.0, 20.0, 30.0], requires_grad=True)
    s3 = torch.tensor([5.0, 6.0, 7.0], requires_grad=True)
    yes, some, none = torch.ones(3, dtype=torch.bool), torch.tensor([True, False, True]), torch.zeros(3).bool()
    obj, m = region_objectives(
        [
            ("global", 0.5, ScoredRegion(s1, yes)),
            ("global", 2.0, ScoredRegion(s3, yes)),
            ("face", 1.0, ScoredRegion(s2, some)),
            ("hand", 1.0, ScoredRegion(s2, none)),
        ]
    )
    assert set(obj) == {"global", "face"}  # no hand anywhere: no hand objective
    assert float(obj["global"].detach()) == pytest.approx(-(0.5 * 6 + 2.0 * 18) / 3)
    assert float(obj["face"].detach()) == pytest.approx(-(10 + 30) / 2)  # the image without a face does not count
    assert m == {"draft/present/global": 1.0, "draft/present/face": pytest.approx(2 / 3)}
    obj["face"].backward()
    assert s2.grad.tolist() == [-0.5, 0.0, -0.5]


def test_config_refuses_a_reward_that_is_not_differentiable():
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", ["learner.loss=draft"])
    assert "rewards[0].target='jpeg_compressibility'" in str(e.value) and "not differentiable" in str(e.value)
    with pytest.raises(ConfigError, match=r"learner\.draft\.k_range"):
        load_config(
            REPO / "configs" / "tiny.yaml",
            ["learner.loss=draft", "rewards.0.target=facescore", "learner.draft.k_range=[3,1]"],
        )
    with pytest.raises(ConfigError, match=r"learner\.reference\.kl_coef=0\.1 .* set learner\.draft\.kl_coef"):
        load_config(
            REPO / "configs" / "tiny.yaml",
            ["learner.loss=draft", "rewards.0.target=facescore", "learner.reference.kl_coef=0.1"],
        )
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["learner.loss=draft", "rewards.0.target=facescore"])
    assert cfg.learner.draft.variant == "draft_k"
    for target in ("pickscore", "clipscore", "hpsv2", "imagereward", "aesthetic"):  # every differentiable builtin
        load_config(REPO / "configs" / "tiny.yaml", ["learner.loss=draft", f"rewards.0.target={target}"])


BOX = (4.0, 4.0, 20.0, 20.0)  # the "face" of 32 x 32 images


@contextlib.contextmanager
def one_thread():
    """On shared cores 2 torch threads stall whenever another process takes one (bench/common.py): 1 here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bright_face_at_fixed_seeds(sampler, settings) -> float:
    """The reward (tests/fixture_rewards.py: BrightFace) of 4 images at seeds that training never samples."""
    from tests.fixture_rewards import BrightFace

    b = sampler.sample(["a", "b", "a", "b"], [900_001, 900_002, 900_003, 900_004], settings)
    return float(np.mean([r.value for r in BrightFace(BOX)(b.images, b.prompts)]))


def draft_learning_gain(
    tiny_model_dir,
    variant: str,
    seed: int = 0,
    rounds: int = 5,
    lr: str = "5e-2",
    scheduler: str = "ddim",
    overrides: tuple[str, ...] = (),
) -> float:
    """The rise of BrightFace at fixed seeds over ``rounds`` rounds of ``variant`` on 4 prompts (2 optimizer steps
    of 2 a round); ``seed`` moves the LoRA initialisation and the learner's x_T. The evaluation samples with the
    deterministic DDIM the learner samples with (``scheduler=default`` on a flow model: its Euler steps)."""
    from families import load_pipeline
    from rlfh.data.batches import PromptBatch
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            "learner.loss=draft",
            f"learner.draft.variant={variant}",
            "learner.draft.k_range=[1,2]",
            "rewards.0.target=tests.fixture_rewards:BrightFace",
            "rewards.0.name=bright_face",
            f"rewards.0.options.box=[{','.join(str(v) for v in BOX)}]",
            "rollout.height=32",
            "rollout.width=32",
            "rollout.num_inference_steps=3",
            "rollout.guidance_scale=1.0",
            f"learner.lr={lr}",
            f"seed={seed}",
            *overrides,
        ],
    )
    lrn = LearnerEngine(cfg)
    s = Sampler(load_pipeline(cfg.model), scheduler=scheduler)
    lc, rc = cfg.model.lora, cfg.rollout
    s.add_lora(lc.rank, lc.alpha, lc.target_modules)
    st = SamplerSettings(rc.num_inference_steps, 1.0, "", rc.height, rc.width, 0.0, scheduler)
    with one_thread():
        before = bright_face_at_fixed_seeds(s, st)
        for _ in range(rounds):
            train(lrn, PromptBatch(["a", "b", "a", "b"]), epochs=1)
        s.load_lora(lrn.lora_state_dict(), lrn.policy_version)
        after = bright_face_at_fixed_seeds(s, st)
    print(f"{variant}, seed {seed}: BrightFace at fixed seeds {before:.4f} -> {after:.4f}")
    return after - before


# The gain over seeds 0-4 (`python -m tests.learning_sweep draft_refl`, `draft_draft_k`; 2 shared cores, 1 thread):
# refl 0.0753, 0.0563, 0.0726, 0.0614, 0.0730 (mean 0.0677, sd 0.0085, min 0.0563); draft_k (K = 1) 0.0692, 0.0615,
# 0.0606, 0.0682, 0.0745 (mean 0.0668, sd 0.0058, min 0.0606). Each margin is below half the smallest gain and below
# mean - 2 sd. alignprop (K ~ U{1, 2}) 0.0582, 0.0747, 0.0307, 0.0510, 0.0541 (mean 0.0537, sd 0.0158, min 0.0307);
# draft_lv (K = 1, lv_n copies) 0.0680, 0.0786, 0.0635 (mean 0.0700, sd 0.0078, min 0.0635): margins about half the
# smallest gain.
LEARNING = {"refl": 0.025, "draft_k": 0.03, "alignprop": 0.015, "draft_lv": 0.03}


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("variant", sorted(LEARNING))
def test_direct_reward_rises_at_fixed_seeds(tiny_model_dir, variant):
    assert draft_learning_gain(tiny_model_dir, variant) >= LEARNING[variant]


@pytest.mark.slow
def test_two_rewards_two_regions_combine_by_mpd(tiny_model_dir):
    """A face reward and a global one, learner.regions.names [global, face]: one objective per region, MPD's
    weights over the two per-region gradients, a KL term at the step with gradient, and the LoRA moves."""
    from rlfh.data.batches import PromptBatch
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            "learner.loss=draft",
            "learner.draft.variant=refl",
            "learner.draft.kl_coef=0.5",
            "learner.regions.names=[global,face]",
            "rewards=[{target: 'tests.fixture_rewards:BrightFace', name: bright_face, options: {box: [4, 4, 20, 20]}},"
            " {target: 'tests.fixture_rewards:RedImage', name: red, weight: 2.0}]",
            "rollout.height=32",
            "rollout.width=32",
            "rollout.num_inference_steps=2",
            "rollout.guidance_scale=2.0",
        ],
    )
    lrn = LearnerEngine(cfg)
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    with one_thread():
        m = train(lrn, PromptBatch(["a", "b", "a", "b"]), epochs=1)
    assert m["regions/face/present"] == 1.0 and m["regions/global/present"] == 1.0
    assert m["mpd/weight/face"] > 0 and m["mpd/weight/global"] > 0  # both per-region gradients in MPD's solve
    assert m["loss/draft/face"] == pytest.approx(-m["draft/reward/bright_face"], rel=1e-5)
    assert m["loss/draft/global"] == pytest.approx(-2.0 * m["draft/reward/red"], rel=1e-5)
    assert "loss/kl" in m and m["draft/first_grad_step"] == 1.0  # refl's range [0.75, 1] of 2 steps: step 1
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())


@pytest.mark.slow
def test_pickscore_trains_through_its_differentiable_path(tiny_model_dir, tmp_path):
    """learner.loss=draft with PickScore (tiny random weights in the published layout): its score_tensor is the
    objective (the loss is minus the reward's mean) and the LoRA moves."""
    from rlfh.data.batches import PromptBatch
    from rlfh.learner.engine import LearnerEngine
    from rlfh.learner.steps import train
    from tests.rewards.tiny_clip import save_pickscore_dir

    pick = save_pickscore_dir(tmp_path / "pickscore", seed=1)
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            "learner.loss=draft",
            f"rewards=[{{target: pickscore, options: {{model: '{pick}', processor: '{pick}'}}}}]",
            "rollout.height=32",
            "rollout.width=32",
            "rollout.num_inference_steps=2",
            "rollout.guidance_scale=1.0",
        ],
    )
    lrn = LearnerEngine(cfg)
    before = {k: v.clone() for k, v in lrn.lora_state_dict().items()}
    with one_thread():
        m = train(lrn, PromptBatch(["a", "b"]), epochs=1)
    assert np.isfinite(m["draft/reward/pickscore"]) and m["loss/draft/global"] == pytest.approx(
        -m["draft/reward/pickscore"], rel=1e-5
    )
    assert any(not torch.equal(before[k], v) for k, v in lrn.lora_state_dict().items())
