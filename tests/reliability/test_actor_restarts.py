"""A reward or rollout actor that Ray is restarting: a restart that takes longer than the
death backoff (a busy machine, a reward that loads big models) is waited for, not counted as more
deaths; deaths past the budget and a restart that never ends fail with a clear error."""

from __future__ import annotations

import types

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

import rewards.actor as reward_actor
from rewards.actor import RewardScorer


def scripted(monkeypatch, outcomes):
    """Each ray.get gives the next outcome (an exception is raised); sleeps are skipped."""
    calls = []

    def get(ref):
        calls.append(ref)
        out = outcomes[min(len(calls), len(outcomes)) - 1]
        if isinstance(out, Exception):
            raise out
        return out

    monkeypatch.setattr(reward_actor.ray, "get", get)
    monkeypatch.setattr("time.sleep", lambda s: None)
    actor = types.SimpleNamespace(score=types.SimpleNamespace(remote=lambda *a: "ref"))
    return actor, calls


def unavailable():
    return ActorUnavailableError("The actor is temporarily unavailable: IOError: The actor is restarting", None)


def test_a_long_restart_is_waited_for_not_counted_as_deaths(monkeypatch):
    actor, calls = scripted(monkeypatch, [ActorDiedError(), *[unavailable() for _ in range(20)], "scores"])
    assert RewardScorer(actor=actor, retries=1).score(None, []) == "scores"
    assert len(calls) == 22


def test_deaths_past_the_budget_fail(monkeypatch):
    actor, calls = scripted(monkeypatch, [ActorDiedError()])
    with pytest.raises(RuntimeError, match="the reward actor died 3 times"):
        RewardScorer(actor=actor, retries=2).score(None, [])


def test_a_restart_that_never_ends_fails(monkeypatch):
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr("time.monotonic", lambda: float(next(clock)))
    actor, calls = scripted(monkeypatch, [unavailable()])
    with pytest.raises(RuntimeError, match="not back 60 s after"):
        RewardScorer(actor=actor, timeout_s=60).score(None, [])


def test_a_weight_sync_waits_for_a_long_rollout_actor_restart(monkeypatch):
    """A rollout actor killed before a weight sync: Ray answers "unavailable" for longer than the
    fleet's retries (a busy machine); the sync waits for it, then loads the weights once it is back."""
    import rollouts.actor as rollout_actor
    from rollouts.actor import RolloutFleet

    outcomes = iter([ActorDiedError(), *[unavailable() for _ in range(10)], "loaded", 7])
    sent = []

    def get(ref):
        out = next(outcomes)
        if isinstance(out, Exception):
            raise out
        return out

    def method(name):
        return types.SimpleNamespace(remote=lambda *a: sent.append(name) or name)

    monkeypatch.setattr(rollout_actor.ray, "get", get)
    monkeypatch.setattr("time.sleep", lambda s: None)
    actor = types.SimpleNamespace(load_weights=method("load_weights"), policy_version=method("policy_version"))
    fleet = RolloutFleet([actor], max_retries=2)
    fleet.sync(["bucket"], 7, True)
    assert fleet.restarts == 1 and sent[-2:] == ["load_weights", "policy_version"]
