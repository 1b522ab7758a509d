"""What every training command does around its loop, written once: ``rlfh train``, ``rlfh offline-dpo``
and ``rlfh train-reward`` share it.

    RUN_DIR/config.yaml      the effective config, saved before anything trains
    RUN_DIR/metrics.jsonl    one row per round (rlfh/run/metrics.py), and wandb
    RUN_DIR/checkpoints/     every ``logging.checkpoint_every`` rounds and after the last (rlfh/run/checkpoints.py)

Resume (``resume: true``, the default) loads the latest intact checkpoint into the learner and rolls
back what later rounds left (their metrics rows, and their rollout-log shards when the loop logs
rollouts), so the rounds after it are redone exactly once; without a checkpoint it sets aside what a
run killed before its first checkpoint left. The same rollback serves a learner that is restarted
inside the run (rlfh/recipes/rounds.py). Teardown runs the registered closers newest first, whatever
happened.

The skeleton knows nothing of what a round is: the learner is anything with ``load_checkpoint(path)``
and ``save_checkpoint(path, extra_state)``, the log anything with ``rollback(round)`` and
``manifest_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


class RunSkeleton:
    """A run directory with its config saved, its metrics logger, checkpoints and teardown.

    Args:
        cfg: the run's config (``run_dir``, ``resume``, ``num_rounds``, ``logging``).
        save: write ``config.yaml`` now (``rlfh train-reward`` checks its inputs first and saves later).
    """

    def __init__(self, cfg, save: bool = True):
        refuse_score_guidance(cfg, "a training run")
        self.cfg = cfg
        self.path = Path(cfg.run_dir).resolve()
        self.logger = None
        self.latest = None  # the checkpoint this process last saved or resumed from: what a restart reloads
        self.sources_state: dict = {}  # the data sources' states of the checkpoint loaded last ({}: none)
        self.closers: list[Callable[[], None]] = []
        if save:
            self.save_config()

    def save_config(self) -> None:
        from rlfh.config.schema import save_config

        self.path.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.path / "config.yaml")

    def on_close(self, close: Callable[[], None]) -> None:
        """Run ``close`` at teardown (newest first)."""
        self.closers.append(close)

    def open_metrics(self):
        """The metrics logger of ``RUN_DIR/metrics.jsonl`` (and wandb), closed at teardown."""
        from rlfh.config.schema import to_dict
        from rlfh.run.metrics import MetricsLogger

        self.logger = MetricsLogger(self.path, self.cfg, to_dict(self.cfg))
        self.on_close(self.logger.close)
        return self.logger

    def resume(self, learner, log=None) -> int:
        """The round to start from: the latest checkpoint's, loaded into ``learner`` (rolling back the
        metrics, and ``log``'s rollouts, of later rounds); 0 without one (setting aside what a run killed
        before its first checkpoint left)."""
        from rlfh.run.checkpoints import latest_checkpoint

        ckpt = latest_checkpoint(self.path) if self.cfg.resume else None
        if ckpt is None:
            self.rollback(0, log)
            return 0
        self.latest = ckpt
        start, version, dropped = self.load(learner, log)
        print(
            f"[rlfh] resuming from {ckpt} (round {start}, policy version {version}); "
            f"{dropped} logged rollouts of later rounds moved to rollouts/rolled_back/"
        )
        return start

    def restore_point(self) -> str:
        return str(self.latest) if self.latest is not None else "round 0 (no checkpoint yet)"

    def restore(self, learner, log=None) -> int:
        """After the learner was restarted inside the run: the checkpoint this run last saved (or resumed
        from) into ``learner``, the later rounds rolled back; the round to replay from. Not
        :func:`latest_checkpoint`: with ``resume: false`` that may be an earlier run's."""
        if self.latest is None:
            self.rollback(0, log)
            return 0
        return self.load(learner, log)[0]

    def load(self, learner, log=None) -> tuple[int, int, int]:
        """:attr:`latest` into ``learner``, later rounds rolled back; (round, policy version, rollouts moved)."""
        state = learner.load_checkpoint(str(self.latest))
        self.sources_state = state.get("sources", {})
        return state["round"], state["policy_version"], self.rollback(state["round"], log)

    def rollback(self, start: int, log=None) -> int:
        """Set aside the metrics rows and logged rollouts of rounds >= ``start``; returns the rollouts moved."""
        from rlfh.run.metrics import rollback_metrics

        dropped = log.rollback(start) if log is not None and log.manifest_path.exists() else 0
        if self.logger is not None:  # the open file would keep writing to the replaced one
            self.logger.rollback(start)
        else:
            rollback_metrics(self.path, start)
        return dropped

    def due(self, rnd: int) -> bool:
        """Whether round ``rnd`` ends with a checkpoint (every ``logging.checkpoint_every``, and the last)."""
        return (rnd + 1) % self.cfg.logging.checkpoint_every == 0 or rnd + 1 == self.cfg.num_rounds

    def checkpoint(self, learner, rounds_done: int, sources: dict | None = None) -> None:
        """``RUN_DIR/checkpoints/round-N`` (complete before ``latest`` names it); ``sources``: the data sources'
        states ({name: state}), restored into :attr:`sources_state` on resume."""
        from rlfh.run.checkpoints import checkpoint_dir, mark_latest

        path = checkpoint_dir(self.path, rounds_done)
        learner.save_checkpoint(str(path), {"round": rounds_done, **({"sources": sources} if sources else {})})
        mark_latest(self.path, path)
        self.latest = path

    def close(self) -> None:
        """Run every closer, newest first; the first error is raised once all have run."""
        first = None
        while self.closers:
            try:
                self.closers.pop()()
            except BaseException as e:  # the rest must still be released
                first = first or e
        if first is not None:
            raise first


def refuse_score_guidance(cfg, what: str) -> None:
    """``rollout.score_guidance`` is for ``rlfh eval``: the samples a run trains on or logs are the policy's own
    (a guided sample is not, and nothing there would apply the guidance)."""
    sg = cfg.rollout.score_guidance
    if sg.enabled:
        from rlfh.config.schema import ConfigError

        raise ConfigError(
            [
                f"rollout.score_guidance.mu={sg.mu}: FaceScore's sampling guidance is applied by `rlfh eval` "
                f"only; {what} samples from the policy itself: set it to 0 here"
            ]
        )
