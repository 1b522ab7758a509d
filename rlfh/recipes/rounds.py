"""The training loop of ``rlfh train`` and ``rlfh offline-dpo``, written once: they differ only in
their :class:`Feed`, where a round's batch comes from.

Each round:
  1. the feed's batch: online, the policy's samples, scored and logged (rlfh/recipes/online.py);
     offline, the pairs rebuilt from a rollout log (rlfh/recipes/offline.py);
  2. the data sources extend it (HG-DPO's real winners, inpainted region pairs; rlfh/data/sources/);
  3. the learner trains on it; the feed hands the new weights to whatever samples (online);
  4. metrics, checkpoint (rlfh/run/skeleton.py), the feed's stop rules (online: the guards).

A learner rank that dies (node lost, OOM, killed) is recovered inside the run: the group's ranks are
restarted, the checkpoint this run last saved (or resumed from) is loaded, and the rounds since are
replayed, with their logged rollouts and metrics rolled back as a resume does; the same seeds give the
same rounds. After ``resources.max_learner_restarts`` restarts the run stops with :class:`LearnerLost`.
"""

from __future__ import annotations

import time


class LearnerLost(RuntimeError):
    """A learner rank died and the restarts of ``resources.max_learner_restarts`` are spent; one line."""


class Feed:
    """Where a loop's batches come from. ``learner``: a ``LearnerGroup`` or an in-process ``LearnerRank``;
    ``log``: the rollout log whose later rounds a resume rolls back (None offline); ``ctx``: what the
    data sources may use (``rlfh.data.sources.SourceContext``)."""

    learner = None
    log = None
    ctx = None

    def begin(self, start: int) -> None:
        """The loop (re)starts at round ``start`` with the learner's current weights."""

    def batch(self, rnd: int, sources: list) -> tuple:
        """Round ``rnd``'s batch before the sources extend it: (batch, metrics, rollouts.RoundData)."""
        raise NotImplementedError

    def after_train(self, rnd: int) -> dict:
        """After the learner's step (online: the weights to the rollout actors); returns metrics."""
        return {}

    def finish(self, rnd: int, metrics: dict, data) -> str | None:
        """Last metrics of the round (online: guards, sample grids); returns why the run must stop, or None."""
        return None

    def restart_learner(self) -> None:
        """Replace the learner's ranks by fresh ones (and whatever samples with them)."""
        raise NotImplementedError


def train_rounds(cfg, skel, feed: Feed, sources: list, desc: str) -> None:
    """Rounds ``start..cfg.num_rounds - 1`` of ``feed`` (module docstring), resumed and recovered."""
    from tqdm import tqdm

    start = skel.resume(feed.learner, feed.log)
    restore_sources(sources, skel.sources_state)
    feed.begin(start)
    logger = skel.open_metrics()
    bar = tqdm(total=cfg.num_rounds, initial=start, desc=desc, unit="round", disable=not cfg.logging.progress)
    skel.on_close(bar.close)
    recovery = Recovery(cfg.resources.max_learner_restarts)
    rnd = start
    while rnd < cfg.num_rounds:
        try:
            metrics, stop = one_round(cfg, skel, feed, sources, rnd)
        except Exception as e:
            rnd = recovery.recover(e, rnd, skel, feed)  # re-raises what is not a learner's death
            restore_sources(sources, skel.sources_state)
            bar.n = rnd
            bar.refresh()
            continue
        logger.log(metrics, step=rnd)
        bar.update(1)
        bar.set_postfix(
            reward=f"{metrics.get('reward/combined/mean', float('nan')):.4g}",
            acc=f"{metrics.get('dpo/implicit_acc', float('nan')):.2f}",
        )
        if stop is not None:
            print(f"[rlfh] early stop after round {rnd}: {stop}")
            break
        rnd += 1


def one_round(cfg, skel, feed: Feed, sources: list, rnd: int) -> tuple[dict, str | None]:
    """One round (module docstring, steps 1-4); returns (its metrics, why the run must stop or None)."""
    t0 = time.perf_counter()
    batch, metrics, data = feed.batch(rnd, sources)
    t1 = time.perf_counter()
    for source in sources:
        batch, stats = source.extend(batch, data)
        metrics.update(stats)
    t2 = time.perf_counter()
    try:
        learner_metrics = feed.learner.train(batch, cfg.learner.epochs_per_round)
    except Exception as e:
        raise RuntimeError(f"round {rnd}: training failed: {e}") from e
    t3 = time.perf_counter()
    metrics.update(feed.after_train(rnd))
    metrics = {
        "round": rnd,
        "policy_version": feed.learner.policy_version(),
        **metrics,
        **learner_metrics,
        "time/pairs_s": metrics.get("time/pairs_s", 0.0) + t2 - t1,
        "time/learner_s": t3 - t2,
        "time/round_s": time.perf_counter() - t0,
    }
    t4 = time.perf_counter()
    if skel.due(rnd):
        skel.checkpoint(feed.learner, rnd + 1, source_states(sources))
        metrics["time/checkpoint_s"] = time.perf_counter() - t4
    stop = feed.finish(rnd, metrics, data)
    if stop is not None and "time/checkpoint_s" not in metrics:
        skel.checkpoint(feed.learner, rnd + 1, source_states(sources))
    return metrics, stop


def source_states(sources: list) -> dict:
    """The data sources' states that a checkpoint keeps ({name: state}; the stateless ones left out)."""
    return {s.name: st for s in sources if (st := s.state())}


def restore_sources(sources: list, states: dict) -> None:
    """Every source where the loaded checkpoint left it (from the start without one)."""
    for s in sources:
        s.load_state(states.get(s.name, {}))


class Recovery:
    """Restarts of the learner group inside the run, at most ``max_restarts`` (``resources.max_learner_restarts``)."""

    def __init__(self, max_restarts: int):
        self.max_restarts, self.used = max_restarts, 0

    def recover(self, error: Exception, rnd: int, skel, feed: Feed) -> int:
        """Call from the ``except`` of a failed round: restart the learner and return the round to replay
        from, or re-raise ``error`` when no learner rank died; :class:`LearnerLost` when the restarts are spent."""
        from rlfh.learner.group import LearnerGroup

        dead = feed.learner.dead_ranks() if isinstance(feed.learner, LearnerGroup) else []
        if not dead:
            raise error
        what = f"learner rank{'s' if len(dead) > 1 else ''} {', '.join(map(str, dead))} died in round {rnd}"
        cause = first_line(error)
        if self.used >= self.max_restarts:
            raise LearnerLost(
                f"{what} ({cause}) and resources.max_learner_restarts={self.max_restarts} "
                f"restart{'s are' if self.max_restarts != 1 else ' is'} spent"
            ) from None
        self.used += 1
        print(
            f"[rlfh] {what} ({cause}); restarting the learner ({self.used} of {self.max_restarts}) and "
            f"replaying from {skel.restore_point()}"
        )
        feed.restart_learner()
        start = skel.restore(feed.learner, feed.log)
        feed.begin(start)
        return start


def first_line(error: BaseException) -> str:
    """The innermost cause's first line (Ray's actor errors run to a page), as ``Type: message``."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()
