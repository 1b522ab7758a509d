"""Region pairs on the tiny model: `rlfh make-region-pairs` (the policy, or a diffusers inpainting
pipeline) -> `rlfh rollouts inspect` -> `rlfh offline-dpo`, and training on the pairs moving the
policy's preference, inside the region, for the image the reward prefers."""

from __future__ import annotations

import json

import numpy as np
import pytest

FACE = "{target: 'tests.fixture_rewards:CompressibleFace', name: compressible_face}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_face_images(tmp_path_factory.mktemp("images"))


def write_face_images(root):
    """Six 64x64 noise images with a flat square where the fixture reward's face box is, in ``root``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(6):
            a = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
            a[8:40, 8:40] = rng.integers(0, 255, 3)
            Image.fromarray(a).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a photo of person {i % 2}"}) + "\n")
    return root


def overrides(model_dir, run_dir, *extra):
    return [
        f"run_dir={run_dir}",
        f"model.path={model_dir}",
        "logging.wandb=false",
        "logging.progress=false",
        "learner.regions.names=[global, face]",
        "data.region_pairs.region=face",
        f"rewards=[{FACE}]",
        *extra,
    ]


def records_by_role(log_dir):
    from rollouts.log import RolloutLog, decode_latent

    recs = RolloutLog(log_dir).records()
    by_id = {r["rollout_id"]: r for r in recs}
    inp = [r for r in recs if r["region_pair"] and r["region_pair"]["role"] == "inpainted"]
    return [(by_id[r["region_pair"]["source_id"]], r) for r in inp], decode_latent


def assert_inpainted_only_in_the_mask(pairs, decode_latent, strength):
    from rlfh.data.region_pairs import inpaint_mask

    for src, inp in pairs:
        assert src["region_pair"]["role"] == "original" and inp["region_pair"]["strength"] == strength
        boxes = [(g["x1"], g["y1"], g["x2"], g["y2"]) for g in src["regions"] if g["region"] == "face"]
        m = inpaint_mask(boxes, (64, 64), inp["region_pair"]["dilate"])[0] > 0  # (8, 8)
        a, b = decode_latent(src), decode_latent(inp)
        np.testing.assert_array_equal(a[:, ~m], b[:, ~m])  # bit-identical outside the mask
        assert np.abs(a[:, m] - b[:, m]).mean() > 1e-3  # and changed inside


@pytest.mark.slow
def test_make_region_pairs_inspect_offline_dpo(images, tiny_model_dir, tmp_path, capsys):
    from rlfh.cli.main import main
    from rlfh.run.metrics import read_metrics

    run = tmp_path / "pairs"
    assert main(["make-region-pairs", "configs/tiny.yaml", str(images), *overrides(tiny_model_dir, run)]) == 0
    assert "6 of 6 images had the region" in capsys.readouterr().out
    pairs, decode_latent = records_by_role(run / "rollouts")
    assert len(pairs) == 6
    # the fixture's face box (8, 8, 40, 40) covers 33^2 / 64^2 = 0.27 of the image: the table's 0.4
    assert_inpainted_only_in_the_mask(pairs, decode_latent, 0.4)

    assert main(["rollouts", "inspect", str(run / "rollouts")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 12 and summary["region_pairs"] == {"face/original": 6, "face/inpainted": 6}

    off = tmp_path / "offline"
    assert (
        main(
            [
                "offline-dpo",
                "configs/offline_dpo.yaml",
                f"rollouts={run / 'rollouts'}",
                "num_rounds=1",
                *overrides(tiny_model_dir, off)[:3],
                "learner.regions.names=[global, face]",
                f"rewards=[{FACE}]",
            ]
        )
        == 0
    )
    (row,) = read_metrics(off)
    won = sum(i["rewards"][0]["value"] > s["rewards"][0]["value"] for s, i in pairs)
    assert row["region_pairs/count"] == 6 and row["pairs/count"] == 0  # real images never pair by caption
    assert row["region_pairs/inpainted_won_share"] == pytest.approx(won / 6)
    assert row["regions/face/present"] == 1.0 and np.isfinite(row["loss/dpo/face"])


def test_diffusers_inpainting_pipeline_keeps_the_outside(images, tiny_model_dir, tmp_path):
    from rlfh.config.schema import load_config
    from rlfh.recipes.region_pairs import make_region_pairs
    from tests.conftest import REPO

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        overrides(
            tiny_model_dir,
            tmp_path / "run",
            f"data.region_pairs.pipeline={tiny_model_dir}",
            "data.region_pairs.strength=0.1",
        ),
    )
    log_dir, counts = make_region_pairs(cfg, str(images))
    assert counts["with_region"] == 6
    pairs, decode_latent = records_by_role(log_dir)
    assert_inpainted_only_in_the_mask(pairs, decode_latent, 0.1)


def test_make_region_pairs_inpaints_with_a_trained_lora(images, tiny_model_dir, tmp_path):
    """data.region_pairs.lora: the policy's LoRA inpaints (the originals are the photos either way)."""
    from rlfh.config.schema import load_config
    from rlfh.recipes.region_pairs import make_region_pairs
    from tests.conftest import REPO
    from tests.rlfh.eval_helpers import make_lora

    lora = make_lora(tiny_model_dir, tmp_path / "lora")
    logs = {}
    for name, extra in (("base", []), ("lora", [f"data.region_pairs.lora={lora}"])):
        cfg = load_config(
            REPO / "configs" / "tiny.yaml",
            overrides(tiny_model_dir, tmp_path / name, "data.region_pairs.strength=0.4", *extra),
        )
        logs[name], counts = make_region_pairs(cfg, str(images))
        assert counts["with_region"] == 6
    (base, decode_latent), (tuned, _) = records_by_role(logs["base"]), records_by_role(logs["lora"])
    assert_inpainted_only_in_the_mask(tuned, decode_latent, 0.4)
    for (src_b, inp_b), (src_l, inp_l) in zip(base, tuned):
        np.testing.assert_array_equal(decode_latent(src_b), decode_latent(src_l))  # the same photos
        assert np.abs(decode_latent(inp_b) - decode_latent(inp_l)).max() > 1e-3  # the LoRA inpainted
        assert str(lora) in inp_l["model_id"] and str(lora) not in inp_b["model_id"]

    with pytest.raises(FileNotFoundError, match="no LoRA there"):
        make_region_pairs(
            load_config(
                REPO / "configs" / "tiny.yaml",
                overrides(tiny_model_dir, tmp_path / "missing", f"data.region_pairs.lora={tmp_path / 'nothing'}"),
            ),
            str(images),
        )
    with pytest.raises(ValueError, match="give one"):
        make_region_pairs(
            load_config(
                REPO / "configs" / "tiny.yaml",
                overrides(
                    tiny_model_dir,
                    tmp_path / "both",
                    f"data.region_pairs.lora={lora}",
                    f"data.region_pairs.pipeline={tiny_model_dir}",
                ),
            ),
            str(images),
        )


@pytest.mark.slow
def test_training_on_region_pairs_moves_the_preference_inside_the_region(images, tiny_model_dir, tmp_path):
    """DPO's implicit reward margin inside the face mask, for the image the logged reward prefers
    (decided here from the log, not by the pair builder), over fixed (t, eps): exactly 0 before
    training (the LoRA starts at zero), positive on average and on most pairs after 12 rounds."""
    import torch

    from rlfh.config.schema import load_config
    from rlfh.learner.actor import LearnerRank
    from rlfh.losses.objectives import region_errors
    from rlfh.recipes.offline import batch_from_log
    from rlfh.recipes.region_pairs import make_region_pairs
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(tiny_model_dir, tmp_path / "run"))
    log_dir, _ = make_region_pairs(cfg, str(images))
    pairs, decode_latent = records_by_role(log_dir)
    cfg = load_config(
        REPO / "configs" / "offline_dpo.yaml",
        [*overrides(tiny_model_dir, tmp_path / "off"), f"rollouts={log_dir}", "learner.epochs_per_round=1"],
    )
    batch, _ = batch_from_log(cfg)
    rank = LearnerRank(num_threads=None)
    rank.setup(cfg)
    lrn = rank.learner

    # the reward's choice, from the log: (preferred, other) latents and the face mask
    def val(r):
        return r["rewards"][0]["value"]

    pref = np.stack([decode_latent(i if val(i) > val(s) else s) for s, i in pairs])
    other = np.stack([decode_latent(s if val(i) > val(s) else i) for s, i in pairs])
    mask = torch.from_numpy(batch.masks_w["face"][:1]).expand(len(pairs), -1, -1, -1)
    gen = torch.Generator().manual_seed(1234)
    draws = [
        (torch.randint(0, 1000, (len(pairs),), generator=gen), torch.randn(pref.shape, generator=gen)) for _ in range(4)
    ]

    @torch.no_grad()
    def margin() -> np.ndarray:
        """Per pair, mean over the draws of (err_ref - err_theta)(preferred) - (err_ref - err_theta)(other)."""
        out = np.zeros(len(pairs))
        enc, added = lrn.condition(list(batch.prompts[:1]) * len(pairs), 64, 64)
        for t, eps in draws:
            gain = []
            for x0 in (pref, other):
                x_t, tt, target = lrn.noised(torch.from_numpy(x0), t, eps)
                e = [
                    region_errors(f(x_t, tt, enc, added), target, "face", {"face": mask}, 5.0)
                    for f in (lrn.reference, lrn.policy)
                ]
                gain.append((e[0] - e[1]).numpy())
            out += (gain[0] - gain[1]) / len(draws)
        return out

    before = margin()
    for _ in range(12):
        rank.train(batch, 1)
    after = margin()
    print(f"region preference margin before {before.round(5)} after {after.round(5)}")
    assert np.abs(before).max() < 1e-6
    # measured on CPU: mean 0.0124, 5 of 6 pairs > 3e-3, one at -9e-5
    assert after.mean() > 3e-3 and (after > 0).sum() >= 5


def test_train_reward_pairs_each_image_with_its_own_inpainted_copy(images, tiny_model_dir, tmp_path):
    """`rlfh make-region-pairs` -> `rlfh train-reward`'s pairs: three photos share each caption, so a
    (round, prompt) group would mix photos; each logged region pair must stay a group of its own."""
    from rlfh.config.schema import load_config
    from rlfh.recipes.region_pairs import make_region_pairs
    from rlfh.recipes.train_reward import region_pairs
    from tests.conftest import REPO

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        overrides(
            tiny_model_dir,
            tmp_path / "run",
            f"data.region_pairs.pipeline={tiny_model_dir}",
            "data.region_pairs.strength=0.4",
        ),
    )
    log_dir, counts = make_region_pairs(cfg, str(images))
    linked, _ = records_by_role(log_dir)
    expected = {frozenset((src["rollout_id"], inp["rollout_id"])) for src, inp in linked}
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        overrides(
            tiny_model_dir,
            tmp_path / "run",
            f"reward_training.pairs={log_dir}",
            "reward_training.region=face",
            "reward_training.winner=reward",
        ),
    )
    pairs, stats = region_pairs(cfg)
    assert stats["pairs/groups"] == 6 and len(pairs) == 6 - counts["ties_or_unscored"]
    assert {frozenset(p.rollout_ids) for p in pairs} <= expected
