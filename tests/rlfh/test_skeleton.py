"""The run skeleton shared by the training commands (rlfh/run/skeleton.py): config saved, checkpoints
every ``checkpoint_every`` rounds and at the end, resume with rollback of later rounds' metrics, the
restore point of an in-run learner restart, and teardown newest first."""

import json

import pytest

from rlfh.config.schema import load_config
from rlfh.run.checkpoints import write_file_manifest
from rlfh.run.skeleton import RunSkeleton
from tests.conftest import REPO


class FakeLearner:
    """Writes and reads complete checkpoints (trainer_state.json + files.json), as LearnerEngine does."""

    def __init__(self):
        self.version, self.loaded = 0, []

    def save_checkpoint(self, path: str, extra_state: dict) -> str:
        from pathlib import Path

        p = Path(path)
        p.mkdir(parents=True)
        (p / "trainer_state.json").write_text(json.dumps({**extra_state, "policy_version": self.version}))
        write_file_manifest(p)
        return path

    def load_checkpoint(self, path: str) -> dict:
        from pathlib import Path

        self.loaded.append(Path(path).name)
        return json.loads((Path(path) / "trainer_state.json").read_text())


def cfg(tmp_path, *over):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [f"run_dir={tmp_path / 'run'}", "num_rounds=5", "logging.checkpoint_every=2", "logging.wandb=false", *over],
    )


def run_rounds(skel, learner, rounds):
    for rnd in rounds:
        learner.version = rnd + 1
        skel.logger.log({"round": rnd}, step=rnd)
        if skel.due(rnd):
            skel.checkpoint(learner, rnd + 1)


def logged_rounds(skel):
    return [json.loads(ln)["round"] for ln in (skel.path / "metrics.jsonl").read_text().splitlines()]


def test_checkpoints_resume_and_roll_back_later_rounds(tmp_path):
    skel, learner = RunSkeleton(cfg(tmp_path)), FakeLearner()
    assert (skel.path / "config.yaml").is_file()
    assert skel.resume(learner) == 0 and skel.restore_point().startswith("round 0")
    skel.open_metrics()
    run_rounds(skel, learner, range(3))  # a crash after round 2: its row is logged, its checkpoint not due
    skel.close()
    assert sorted(p.name for p in (skel.path / "checkpoints").glob("round-*")) == ["round-000002"]

    again, learner = RunSkeleton(cfg(tmp_path)), FakeLearner()
    assert again.resume(learner) == 2 and learner.loaded == ["round-000002"]
    assert logged_rounds(again) == [0, 1]  # round 2 is redone, not logged twice
    again.open_metrics()
    run_rounds(again, learner, range(2, 4))
    again.logger.log({"round": 4}, step=4)  # the learner dies in round 4, after its row, before its checkpoint
    # an in-run restart reloads the checkpoint this run saved last and rolls back the rounds after it,
    # through the open metrics file, which keeps appending
    assert again.restore(learner) == 4 and learner.loaded[-1] == "round-000004"
    assert logged_rounds(again) == [0, 1, 2, 3]
    run_rounds(again, learner, range(4, 5))
    again.close()
    assert logged_rounds(again) == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (again.path / "checkpoints").glob("round-*")) == [
        "round-000002",
        "round-000004",
        "round-000005",
    ]  # every 2 rounds, and the last


def test_data_source_states_go_into_the_checkpoint_and_come_back_on_resume(tmp_path):
    """rlfh/recipes/rounds.py: source_states into skel.checkpoint, restore_sources from skel.sources_state."""
    from rlfh.recipes.rounds import restore_sources, source_states

    class Counter:
        name = "counter"

        def __init__(self):
            self.n = 0

        def state(self):
            return {"n": self.n}

        def load_state(self, state):
            self.n = state.get("n", 0)

    class Stateless(Counter):
        name = "stateless"

        def state(self):
            return {}

    skel, learner, source = RunSkeleton(cfg(tmp_path)), FakeLearner(), Counter()
    skel.resume(learner)
    source.n = 7
    skel.checkpoint(learner, 2, source_states([source, Stateless()]))
    again, fresh = RunSkeleton(cfg(tmp_path)), Counter()
    assert again.resume(FakeLearner()) == 2 and again.sources_state == {"counter": {"n": 7}}
    restore_sources([fresh], again.sources_state)
    assert fresh.n == 7
    restore_sources([fresh], {})  # replayed from round 0: from the start
    assert fresh.n == 0


def test_restore_without_resume_never_takes_an_earlier_runs_checkpoint(tmp_path):
    old = RunSkeleton(cfg(tmp_path))
    old.open_metrics()
    run_rounds(old, FakeLearner(), range(2))
    old.close()
    skel, learner = RunSkeleton(cfg(tmp_path, "resume=false")), FakeLearner()
    assert skel.resume(learner) == 0 and not learner.loaded
    skel.open_metrics()
    run_rounds(skel, learner, range(1))  # no checkpoint of its own yet
    assert skel.restore(learner) == 0 and not learner.loaded  # the old round-2 checkpoint is not this run's
    assert logged_rounds(skel) == []
    skel.close()


def test_close_runs_every_closer_newest_first_and_raises_the_first_error(tmp_path):
    skel, order = RunSkeleton(cfg(tmp_path), save=False), []
    assert not (skel.path / "config.yaml").exists()  # train-reward checks its inputs before writing

    def fail():
        order.append("fail")
        raise RuntimeError("first")

    skel.on_close(lambda: order.append("a"))
    skel.on_close(fail)
    skel.on_close(lambda: order.append("c"))
    with pytest.raises(RuntimeError, match="first"):
        skel.close()
    assert order == ["c", "fail", "a"]
