"""The SD3 family through the whole product on its tiny model (the checks: tests/flow_end_to_end.py):
`rlfh train configs/tiny.yaml model.path=<tiny SD3>` unchanged with Diffusion-DPO and, with only
`learner.loss=ddpo rollout.eta=1.0` added, DDPO on the Flow-GRPO SDE sampler; the LoRA the DPO run exports
in the stock ``StableDiffusion3Pipeline``; `rlfh offline-dpo` from its log.
"""

from __future__ import annotations

import pytest

from tests.flow_end_to_end import FlowEndToEnd

pytestmark = pytest.mark.slow


class TestSD3EndToEnd(FlowEndToEnd):
    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tiny_sd3_dir):
        return tiny_sd3_dir

    @staticmethod
    def stock_pipeline(model_dir):
        """As diffusers documents loading SD3 without T5 (the tiny model has none)."""
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe
