"""The FLUX.1 family through the whole product on its tiny model (the checks: tests/flow_end_to_end.py):
`rlfh train configs/tiny.yaml model.path=<tiny FLUX>` unchanged with Diffusion-DPO for two rounds and, with
only `learner.loss=ddpo rollout.eta=1.0` added, one round of DDPO on the Flow-GRPO SDE sampler; the LoRA the
DPO run exports in the stock ``FluxPipeline``; `rlfh offline-dpo` from its log.
"""

from __future__ import annotations

import pytest

from tests.flow_end_to_end import FlowEndToEnd

pytestmark = pytest.mark.slow


class TestFluxEndToEnd(FlowEndToEnd):
    ddpo_rounds = 1  # one round shows the SDE sampler's log-probs scored by the learner
    stock_kwargs = {"max_sequence_length": 32}  # the tiny T5's length, as rlfh encodes (the pipeline's default: 512)

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tiny_flux_dir):
        return tiny_flux_dir

    @staticmethod
    def stock_pipeline(model_dir):
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe
