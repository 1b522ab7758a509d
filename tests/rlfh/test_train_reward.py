"""`rlfh train-reward`: a FaceScore-style scorer fine-tuned on logged region pairs (tiny BLIP).

The pairs are synthetic (tests/rlfh/region_pair_logs.py): the winner's box holds a texture, the
loser's a flat fill, each box with its own random colour, so the random scorer ranks them at
chance and has to learn the texture. The learning test trains at lr 1e-3 (the default 1e-5 is
FaceScore's for a pretrained ViT-L; the tiny random model needs larger steps to move in 4 epochs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.base import Detection
from rewards.detectors.base import FixedBoxes
from rollouts.log import RolloutLog, RolloutLogError, decode_png
from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published
from tests.rlfh.region_pair_logs import BOX, record, write_pair_log

REPO = Path(__file__).resolve().parents[2]
BASE = [
    "logging.wandb=false",
    "logging.progress=false",
    "rewards=[{target: jpeg_compressibility, name: quality}]",
    "reward_training.vision_heads=2",
    "reward_training.winner=reward",  # the synthetic logs hold plain groups, paired by score
]


def _init(tmp_path: Path, seed: int = 0) -> Path:
    return save_published(
        random_model(TINY_VISION, TINY_MED_CONFIG, seed=seed), TINY_MED_CONFIG, tmp_path / "init", "FS_model.pt"
    )


def _cfg(tmp_path: Path, *overrides: str):
    from rlfh.config.schema import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={tmp_path / 'run'}", *BASE, *overrides])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 2])
def test_heldout_ranking_accuracy_rises_from_chance(tmp_path, seed):
    """Seed 0 goes through the CLI (`rlfh train-reward CONFIG pairs= init=` shorthands); measured
    held-out accuracy (15 pairs): seed 0 0.60 -> 0.93, seed 2 0.47 -> 1.00."""
    from rlfh.cli.main import main, train_reward_overrides

    init = _init(tmp_path, seed)
    log = write_pair_log(tmp_path / "log", 60, seed)
    args = [
        f"run_dir={tmp_path / 'run'}",
        *BASE,
        f"seed={seed}",
        f"pairs={log}",
        f"init={init}",
        "region=face",
        "reward_training.lr=1e-3",
        "reward_training.epochs=4",
        "reward_training.heldout_fraction=0.25",
    ]
    if seed == 0:
        assert main(["train-reward", str(REPO / "configs" / "tiny.yaml"), *args]) == 0
    else:
        from rlfh.config.schema import load_config
        from rlfh.recipes.train_reward import train_reward

        train_reward(load_config(REPO / "configs" / "tiny.yaml", train_reward_overrides(args)))
    rows = _metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]
    before, after = rows[0]["heldout/accuracy"], rows[-1]["heldout/accuracy"]
    assert rows[0]["pairs/heldout"] == 15 and rows[0]["pairs/train"] == 45
    assert abs(before - 0.5) <= 0.2, f"the untrained scorer should rank at chance, got {before}"
    assert after >= 0.85 and after >= before + 0.3, (before, after)
    assert rows[-1]["heldout/loss"] < rows[0]["heldout/loss"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run (2 epochs, lr 1e-3) whose output the loader tests read."""
    from rlfh.recipes.train_reward import train_reward

    tmp = tmp_path_factory.mktemp("trained")
    init = _init(tmp)
    log = write_pair_log(tmp / "log", 12, seed=1)
    cfg = _cfg(
        tmp,
        f"reward_training.pairs={log}",
        f"reward_training.init={init}",
        "reward_training.lr=1e-3",
        "reward_training.epochs=2",
        "reward_training.heldout_fraction=0.5",
        "reward_training.batch_size=4",
    )
    return {"run": train_reward(cfg), "init": init, "log": log, "cfg": cfg}


def test_written_folder_loads_with_the_facescore_reward(trained):
    """FaceScore with options {model: RUN_DIR} scores the held-out images as the trained model did."""
    from rewards.registry import build_reward
    from rlfh.recipes.train_reward import region_pairs, split_heldout

    run = trained["run"]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "FS_model.pt",
        "config.yaml",
        "med_config.json",
        "metrics.jsonl",
    ]
    assert json.loads((run / "med_config.json").read_text()) == TINY_MED_CONFIG
    reward = build_reward("facescore", {"model": str(run), "vision_heads": 2, "detector": FixedBoxes([[]])})
    # the held-out pairs again, as full images, scored through the reward's own crop of the logged box
    records = {
        r["rollout_id"]: decode_png(r["image"]) for r in RolloutLog(trained["log"]).records(["rollout_id", "image"])
    }
    pairs, _ = region_pairs(trained["cfg"])
    _, held = split_heldout(len(pairs), 0.5, trained["cfg"].seed)
    margins, wins = [], []
    for i in held:
        w, l = pairs[i].rollout_ids
        reward.detector = FixedBoxes([[Detection(BOX, 0.99)], [Detection(BOX, 0.99)]])
        sw, sl = (r.value for r in reward(np.stack([records[w], records[l]]), ["x", "x"]))
        margins.append(sw - sl)
        wins.append(sw > sl)
    last = _metrics(run)[-1]
    assert np.mean(margins) == pytest.approx(last["heldout/margin_mean"], abs=1e-4)
    assert np.mean(wins) == last["heldout/accuracy"]


def test_first_70_percent_of_each_encoder_stays_frozen(trained):
    """Tiny model: 2 ViT blocks and 2 text layers, floor(0.7 * 2) = 1 of each frozen with the embeddings."""
    before = torch.load(trained["init"] / "FS_model.pt", weights_only=True)
    after = torch.load(trained["run"] / "FS_model.pt", weights_only=True)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_prefixes = (
        "blip.visual_encoder.blocks.0.",
        "blip.visual_encoder.patch_embed",
        "blip.visual_encoder.pos_embed",
        "blip.visual_encoder.cls_token",
        "blip.text_encoder.encoder.layer.0.",
        "blip.text_encoder.embeddings.",
        "blip.vision_proj.",
        "blip.text_proj.",
    )
    assert not {k for k in changed if k.startswith(frozen_prefixes)}
    for trained_prefix in (
        "blip.visual_encoder.blocks.1.",
        "blip.visual_encoder.norm.",
        "blip.text_encoder.encoder.layer.1.",
        "mlp.layers.",
    ):
        assert any(k.startswith(trained_prefix) for k in changed), trained_prefix
    row = _metrics(trained["run"])[0]
    assert (row["freeze/vision_layers_frozen"], row["freeze/text_layers_frozen"]) == (1, 1)


class _Encoder(torch.nn.Module):
    """The attributes freeze_leading_layers reads of BlipVisionModel (layers) / BlipTextModel (layer)."""

    def __init__(self, depth: int, attr: str):
        super().__init__()
        self.embeddings = torch.nn.Linear(1, 1)
        self.encoder = torch.nn.Module()
        setattr(self.encoder, attr, torch.nn.ModuleList(torch.nn.Linear(1, 1) for _ in range(depth)))


def _fake_scorer(vision_depth: int, text_depth: int) -> torch.nn.Module:
    model = torch.nn.Module()
    model.visual_encoder, model.text_encoder = _Encoder(vision_depth, "layers"), _Encoder(text_depth, "layer")
    model.vision_proj, model.text_proj, model.mlp = (torch.nn.Linear(1, 1) for _ in range(3))
    return model


def test_freeze_counts_on_the_published_depths():
    """ViT-L's 24 blocks and BERT's 12 layers: 16 and 8 frozen at FaceScore's 70%, as ImageReward's fix_rate."""
    from rlfh.recipes.train_reward import freeze_leading_layers

    model = _fake_scorer(24, 12)
    counts = freeze_leading_layers(model, 0.7)
    assert (counts["freeze/vision_layers_frozen"], counts["freeze/text_layers_frozen"]) == (16, 8)
    vis, txt = model.visual_encoder, model.text_encoder
    assert [b.weight.requires_grad for b in vis.encoder.layers] == [False] * 16 + [True] * 8
    assert [b.weight.requires_grad for b in txt.encoder.layer] == [False] * 8 + [True] * 4
    assert not vis.embeddings.weight.requires_grad and not txt.embeddings.weight.requires_grad
    assert not model.vision_proj.weight.requires_grad and not model.text_proj.weight.requires_grad
    assert model.mlp.weight.requires_grad
    # 0.7 * 30 is 20.999... in floats: still 21 blocks; 0 and 1 freeze nothing / every block
    assert freeze_leading_layers(_fake_scorer(30, 10), 0.7)["freeze/vision_layers_frozen"] == 21
    assert freeze_leading_layers(model, 0.0)["params/trainable"] == 24 * 2 + 12 * 2 + 2
    assert freeze_leading_layers(model, 1.0)["params/trainable"] == 2  # the MLP head alone


def test_pairs_follow_the_chosen_score_and_crop_one_box(tmp_path):
    """Winner by the combined score by default or by a named reward; the winner's box, else the loser's."""
    from rlfh.recipes.train_reward import region_pairs

    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(2))
    box_w, box_l = (2.0, 3.0, 12.0, 15.0), (20.0, 20.0, 30.0, 30.0)
    rows = [
        record("r0", 0, "p", a, {"quality": 1.0, "other": 0.0}, {"hand": [(box_w, 0.6)], "face": [(box_l, 0.9)]}),
        record("r1", 0, "p", b, {"quality": 0.0, "other": 5.0}, {"hand": [(box_l, 0.9)]}),
        record("r2", 1, "p", a, {"quality": None, "other": 1.0}, {}),  # unscored: no pair in round 1
        record("r3", 1, "p", b, {"quality": 2.0, "other": 0.0}, {}),
    ]
    RolloutLog(tmp_path / "log").append(rows)
    pairs, stats = region_pairs(
        _cfg(tmp_path, f"reward_training.pairs={tmp_path / 'log'}", "reward_training.region=hand")
    )
    assert len(pairs) == 1 and pairs[0].rollout_ids == ("r0", "r1") and stats["samples/unscored"] == 1
    # FaceScore's crop of the winner's hand box (1 px wider per side) in both images
    assert np.array_equal(pairs[0].win, a[2:16, 1:13]) and np.array_equal(pairs[0].lose, b[2:16, 1:13])
    pairs, stats = region_pairs(
        _cfg(
            tmp_path,
            f"reward_training.pairs={tmp_path / 'log'}",
            "reward_training.region=hand",
            "reward_training.score=other",
        )
    )
    assert [p.rollout_ids for p in pairs] == [("r1", "r0")]  # round 1's pair (r2, r3) has no hand box
    assert stats["pairs/no_region"] == 1 and stats["samples/unscored"] == 0
    assert np.array_equal(pairs[0].win, b[19:31, 19:31])  # the winner r1's own box


def test_bad_inputs_give_clear_errors(tmp_path):
    from rlfh.recipes.train_reward import region_pairs, train_reward

    init = _init(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RolloutLogError, match="reward_training.pairs: .*holds no shards"):
        train_reward(_cfg(tmp_path, f"reward_training.pairs={tmp_path / 'empty'}", f"reward_training.init={init}"))
    with pytest.raises(ValueError, match="pass pairs=ROLLOUT_DIR"):
        region_pairs(_cfg(tmp_path))
    with pytest.raises(ValueError, match=r"reward_training.init='/no/such/scorer': no such directory"):
        train_reward(_cfg(tmp_path, f"reward_training.pairs={tmp_path}", "reward_training.init=/no/such/scorer"))
    with pytest.raises(ValueError, match="pass init=SCORER_DIR"):
        train_reward(_cfg(tmp_path, f"reward_training.pairs={tmp_path}"))
    with pytest.raises(ValueError, match=r"lacks .*FS_model.pt"):
        train_reward(_cfg(tmp_path, f"reward_training.pairs={tmp_path}", f"reward_training.init={tmp_path / 'empty'}"))
    # a log whose groups all tie: no pair, and the error says what the log holds
    im = np.zeros((32, 32, 3), np.uint8)
    RolloutLog(tmp_path / "ties").append(
        [record(f"t{i}", 0, "p", im, {"quality": 1.0}, {"face": [(BOX, 0.9)]}) for i in range(2)]
    )
    with pytest.raises(ValueError, match=r"no \(winner, loser\) pair for region 'face'.*2 records in 1"):
        region_pairs(_cfg(tmp_path, f"reward_training.pairs={tmp_path / 'ties'}"))
    with pytest.raises(ValueError, match=r"reward_training.score='facescore' is not a reward in the rollout log"):
        region_pairs(_cfg(tmp_path, f"reward_training.pairs={tmp_path / 'ties'}", "reward_training.score=facescore"))
    with pytest.raises(ValueError, match=r"rewards \['jpeg_compressibility'\] are not in the rollout log"):
        region_pairs(_cfg(tmp_path, f"reward_training.pairs={tmp_path / 'ties'}", "rewards=[jpeg_compressibility]"))
    # too few pairs to hold any out
    write_pair_log(tmp_path / "one", 1, seed=0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        train_reward(_cfg(tmp_path, f"reward_training.pairs={tmp_path / 'one'}", f"reward_training.init={init}"))


def test_config_rules_name_the_key(tmp_path):
    from rlfh.config.schema import ConfigError

    with pytest.raises(ConfigError) as e:
        _cfg(
            tmp_path,
            "reward_training.freeze_fraction=1.2",
            "reward_training.lr=0",
            "reward_training.epochs=0",
            "reward_training.heldout_fraction=1",
            "reward_training.region=elbow",
            "reward_training.batch_size=0",
        )
    text = str(e.value)
    for key in (
        "reward_training.freeze_fraction=1.2",
        "reward_training.lr=0.0",
        "reward_training.epochs=0",
        "reward_training.heldout_fraction=1.0",
        "reward_training.region='elbow' has no default prompt",
        "reward_training.batch_size=0",
    ):
        assert key in text, key
    assert (
        _cfg(tmp_path, "reward_training.region=elbow", "reward_training.prompt=An elbow.").reward_training.prompt
        == "An elbow."
    )


def test_walkthrough_hand_score_entry_loads_the_trained_folder(trained):
    """docs/walkthrough.md section 8: the handscore entry, its model pointed at a trained run directory."""
    import yaml

    from rewards.registry import build_reward
    from rlfh.config.schema import config_from_dict
    from tests.test_walkthrough import block

    entries = yaml.safe_load(block("handscore.yaml"))["rewards"]
    cfg = config_from_dict({"rewards": entries})  # the targets resolve and the keys are valid
    (hand,) = [e for e in cfg.rewards if e.name == "handscore"]
    assert hand.options == {"model": "runs/handscore", "region": "hand"}
    # the detector and the tiny model's head count are what a test machine needs instead of MediaPipe and ViT-L
    options = {
        **hand.options,
        "model": str(trained["run"]),
        "vision_heads": 2,
        "detector": FixedBoxes([[Detection(BOX, 0.99)]], region="hand"),
    }
    reward = build_reward(hand.target, options, name=hand.name)
    (res,) = reward(decode_png(RolloutLog(trained["log"]).records(["image"])[0]["image"])[None], ["x"])
    assert reward.name == "handscore" and reward.region == "hand" and res.value is not None
    assert res.regions == {"hand": [Detection(BOX, 0.99)]}


def test_winner_original_pairs_each_region_pair_without_a_score(tmp_path):
    """FaceScore's labelling rule (the default): the original wins its inpainted copy even where the
    logged reward prefers the copy; a log of plain samples has no such pair and the error says so."""
    from rlfh.recipes.train_reward import region_pairs

    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(4)]
    box = (2.0, 3.0, 12.0, 15.0)
    rows = []
    for k in range(2):
        orig = record(f"o{k}", 0, f"p{k}", ims[2 * k], {"quality": 0.0}, {"face": [(box, 0.9)]})
        inp = record(f"i{k}", 0, f"p{k}", ims[2 * k + 1], {"quality": 1.0}, {})
        orig["region_pair"] = {"role": "original", "source_id": None, "region": "face", "strength": None, "dilate": 16}
        inp["region_pair"] = {
            "role": "inpainted",
            "source_id": f"o{k}",
            "region": "face",
            "strength": 0.4,
            "dilate": 16,
        }
        rows += [orig, inp]
    RolloutLog(tmp_path / "log").append(rows)
    log = f"reward_training.pairs={tmp_path / 'log'}"
    pairs, stats = region_pairs(_cfg(tmp_path, log, "reward_training.winner=original"))
    assert [p.rollout_ids for p in pairs] == [("o0", "i0"), ("o1", "i1")] and stats["pairs/groups"] == 2
    assert np.array_equal(pairs[0].win, ims[0][2:16, 1:13]) and np.array_equal(pairs[0].lose, ims[1][2:16, 1:13])
    from rlfh.config.schema import load_config

    assert load_config(REPO / "configs" / "tiny.yaml", []).reward_training.winner == "original"
    by_reward, _ = region_pairs(_cfg(tmp_path, log))  # BASE: winner=reward, the copy scored higher
    assert [p.rollout_ids for p in by_reward] == [("i0", "o0"), ("i1", "o1")]
    write_pair_log(tmp_path / "plain", 2, seed=0)
    with pytest.raises(ValueError, match=r"winner=original pairs the log's region pairs"):
        region_pairs(_cfg(tmp_path, f"reward_training.pairs={tmp_path / 'plain'}", "reward_training.winner=original"))
