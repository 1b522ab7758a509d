"""The sampler of an in-process learning test: the config's model with the learner's LoRA loaded, as the
rollout actors hold it after a weight sync."""

from __future__ import annotations

from families import load_pipeline
from rollouts.sampler import Sampler


def policy_sampler(cfg, lrn, scheduler: str = "default") -> Sampler:
    s = Sampler(load_pipeline(cfg.model), scheduler=scheduler)
    lc = cfg.model.lora
    s.add_lora(lc.rank, lc.alpha, lc.target_modules)
    s.load_lora(lrn.lora_state_dict(), lrn.policy_version)
    return s
