"""FaceScore's sampling guidance (arXiv 2406.17100, appendix, eqs. 5-6): the formulas on worked numbers."""

import pytest
import torch

from rollouts.guidance import ScoreGuidance, guided_eps, x0_estimate


def test_x0_estimate_eq5():
    # abar 0.64: z_0 = (z_t - 0.6 eps) / 0.8
    z = torch.tensor([[1.0, -0.4]])
    eps = torch.tensor([[0.5, 2.0]])
    torch.testing.assert_close(x0_estimate(z, eps, 0.64), torch.tensor([[0.875, -2.0]]))
    # one abar per sample: (1 - 0.6) / 0.8, (1 - 0.8) / 0.6
    z2, eps2 = torch.ones(2, 1), torch.ones(2, 1)
    torch.testing.assert_close(x0_estimate(z2, eps2, torch.tensor([0.64, 0.36])), torch.tensor([[0.5], [1 / 3]]))


def test_guided_eps_eq6_with_clamp():
    eps = torch.tensor([0.5, -0.2, 0.0])
    grad = torch.tensor([2.0, -10.0, 1.0])
    # mu * grad = (0.2, -1.0, 0.1); clamped to 0.5: (0.2, -0.5, 0.1)
    torch.testing.assert_close(guided_eps(eps, grad, 0.1, 0.5), torch.tensor([0.3, 0.3, -0.1]))
    torch.testing.assert_close(guided_eps(eps, grad, 0.1, None), torch.tensor([0.3, 0.8, -0.1]))


def test_gradient_is_taken_at_z_t_through_eq5_with_eps_constant():
    # score = sum_c,h,w weight * image with image = first 3 channels of z_0: d score / d z_t = weight / sqrt(abar)
    weight = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    guide = ScoreGuidance(lambda im: (im * weight).sum((1, 2, 3)), mu=0.3, clamp=None)
    z = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    grad = guide.gradient(z, eps, 0.25, lambda x0: x0[:, :3])
    expected = torch.zeros_like(z)
    expected[:, :3] = weight / 0.5
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(guide.apply(z, eps, 0.25, lambda x0: x0[:, :3]), eps - 0.3 * expected)
    # nothing to score (a constant score): no guidance
    flat = ScoreGuidance(lambda im: torch.zeros(im.shape[0]), mu=1.0)
    torch.testing.assert_close(flat.apply(z, eps, 0.25, lambda x0: x0[:, :3]), eps)


@pytest.mark.parametrize("mu, clamp", [(0.0, None), (-1.0, None), (1.0, 0.0)])
def test_bad_knobs_are_refused(mu, clamp):
    with pytest.raises(ValueError, match="score guidance"):
        ScoreGuidance(lambda im: im.sum((1, 2, 3)), mu=mu, clamp=clamp)


def center_face(**_):
    """A detector (``module:callable`` in a config) finding one face in the middle of a 64 px image."""
    from rewards.base import Detection

    class Center:
        region = "face"

        def detect(self, images):
            return [[Detection((16.0, 16.0, 48.0, 48.0), 0.99)] for _ in images]

    return Center()


@pytest.fixture(scope="module")
def fs_dir(tmp_path_factory):
    from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published

    model = random_model(TINY_VISION, TINY_MED_CONFIG, seed=0)
    return save_published(model, TINY_MED_CONFIG, tmp_path_factory.mktemp("fs"), "FS_model.pt")


@pytest.fixture(scope="module")
def tiny_facescore(fs_dir):
    """The random-weight FaceScore of the reward tests, scoring one fixed face box in the middle of 64 px images."""
    from rewards.facescore import FaceScore

    return FaceScore(str(fs_dir), detector=center_face(), vision_heads=2)


SEEDS = [0, 1, 2, 3]


def test_guidance_raises_facescore_on_the_tiny_model(tiny_model_dir, tiny_facescore):
    from families import load_pipeline
    from rlfh.config.schema import load_config
    from rollouts.sampler import Sampler
    from rollouts.types import SamplerSettings
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}"])
    sampler = Sampler(load_pipeline(cfg.model))  # EulerDiscreteScheduler, epsilon prediction
    settings = SamplerSettings(4, 1.0, "", 64, 64)
    prompts = ["a photo of a person"] * len(SEEDS)

    def facescore(batch):  # the reward's own (uint8, PIL-resize) path, not the guide's
        return torch.tensor([r.value for r in tiny_facescore.score(batch.images, prompts)])

    base = facescore(sampler.sample(prompts, SEEDS, settings))
    guided = facescore(sampler.sample(prompts, SEEDS, settings, guidance=ScoreGuidance(tiny_facescore.guide(), 10.0)))
    gain = guided - base
    # measured (CPU, torch 2.x): base -1.053, -0.969, -0.969, -1.096; gain 0.708, 0.229, 0.105, 0.449 (mean 0.373).
    # Margins below the smallest: every seed gains, and the mean gain stays well above any rounding.
    assert bool((gain > 0.05).all()) and float(gain.mean()) > 0.2, gain.tolist()


def test_score_guidance_config(tiny_cfg):
    from rlfh.config.schema import ConfigError
    from rlfh.run.skeleton import RunSkeleton

    fs = "rewards=[{target: facescore, options: {model: /nonexistent}}]"
    cfg = tiny_cfg(fs, "rollout.score_guidance.mu=10", "rollout.score_guidance.clamp=0.5")
    assert cfg.rollout.score_guidance.enabled and cfg.rollout.score_guidance.reward == "facescore"
    with pytest.raises(ConfigError, match="applied by `rlfh eval` only"):
        RunSkeleton(cfg, save=False)  # a training run samples from the policy itself
    with pytest.raises(ConfigError, match="rollout.score_guidance.reward='facescore': needs a `rewards:` entry"):
        tiny_cfg("rollout.score_guidance.mu=10")
    with pytest.raises(ConfigError, match="rollout.score_guidance.clamp=0.0"):
        tiny_cfg(fs, "rollout.score_guidance.mu=1", "rollout.score_guidance.clamp=0")


def test_rlfh_eval_builds_the_guidance_from_the_config(tiny_cfg, fs_dir):
    from rewards.composite import RewardSet
    from rlfh.eval.evaluate import score_guidance

    entry = f"{{target: facescore, name: fs, options: {{model: {fs_dir}, vision_heads: 2, "
    entry += "detector: 'tests.rollouts.test_guidance:center_face'}}"
    cfg = tiny_cfg(f"rewards=[{entry}]", "rollout.score_guidance.reward=fs", "rollout.score_guidance.mu=10")
    with RewardSet.from_config(cfg.rewards) as rewards:
        assert score_guidance(tiny_cfg(f"rewards=[{entry}]"), rewards) is None  # mu 0: off
        guide = score_guidance(cfg, rewards)
        assert guide.mu == 10.0 and guide.clamp is None
        images = torch.rand(2, 3, 64, 64, requires_grad=True)
        scores = guide.score(images)
        want = rewards.rewards[0].reward.score(
            (images.detach() * 255).round().byte().permute(0, 2, 3, 1).numpy(), ["a", "b"]
        )
        # the smooth resize of the guide differs from the reward's PIL path by about 1e-3 (DifferentiableFaceScore)
        torch.testing.assert_close(scores.detach(), torch.tensor([r.value for r in want]), atol=2e-2, rtol=0)
        (grad,) = torch.autograd.grad(scores.sum(), images)
        # the face box only (the crop widens it by 1 px per side)
        assert grad[:, :, 16:48, 16:48].abs().sum() > 0 and grad[:, :, :14].abs().sum() == 0


def test_rlfh_eval_samples_with_the_guidance(tiny_cfg, fs_dir, tmp_path):
    """rlfh eval with rollout.score_guidance: both sides sampled with it (the same model here: identical images),
    FaceScore higher than the same eval without guidance, and the knobs recorded in eval.json."""
    from rlfh.eval.evaluate import ModelSpec, evaluate

    entry = f"{{target: facescore, options: {{model: {fs_dir}, vision_heads: 2, "
    entry += "detector: 'tests.rollouts.test_guidance:center_face'}}"
    base = ["rollout.num_inference_steps=4", "rollout.guidance_scale=1.0", f"rewards=[{entry}]"]
    spec, prompts = ModelSpec(tiny_cfg().model.path), ["a photo of a person"]
    means = {}
    for mu in (0, 10):
        cfg = tiny_cfg(*base, f"rollout.score_guidance.mu={mu}")
        summary = evaluate(cfg, spec, prompts, SEEDS, tmp_path / f"mu{mu}", baseline=spec, progress=False, report=False)
        fs = summary["rewards"]["facescore"]
        assert fs["model"]["mean"] == pytest.approx(fs["baseline"]["mean"])  # both sides guided alike
        means[mu] = fs["model"]["mean"]
        recorded = summary["settings"]["score_guidance"]
        assert recorded == (None if mu == 0 else {"reward": "facescore", "mu": 10.0, "clamp": None})
    assert means[10] > means[0] + 0.2, means  # the sampler test's gains at the same seeds: mean 0.37
