"""A flow-matching family through the whole product on its tiny model, the checks the SD3 and FLUX.1
end-to-end tests share (tests/test_sd3_end_to_end.py, tests/test_flux_end_to_end.py): `rlfh train
configs/tiny.yaml model.path=<tiny model>` unchanged (real Ray, real DeepSpeed over gloo) with Diffusion-DPO
on the velocity error and, with only `learner.loss=ddpo rollout.eta=1.0` added, DDPO on the Flow-GRPO SDE
sampler; the LoRA the DPO run exports in the family's stock pipeline; `rlfh offline-dpo` from its log.

A family's test subclasses :class:`FlowEndToEnd` (pytest collects the subclass in its own file) and gives
its ``model_dir`` fixture and :meth:`FlowEndToEnd.stock_pipeline`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_end_to_end import rlfh


def train(run_dir, model_dir, rounds: int, *extra):
    rlfh(
        "train",
        "configs/tiny.yaml",
        f"run_dir={run_dir}",
        f"model.path={model_dir}",
        f"num_rounds={rounds}",
        "logging.wandb=false",
        "logging.progress=false",
        *extra,
    )
    return run_dir


class FlowEndToEnd:
    """The end-to-end checks of one flow-matching family (the subclass names it)."""

    dpo_rounds = 2
    ddpo_rounds = 2
    stock_kwargs: dict = {}  # the stock pipeline's call arguments besides the test's

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls) -> str:
        raise NotImplementedError("a family's end-to-end test gives its tiny model's folder")

    @staticmethod
    def stock_pipeline(model_dir: str):
        """The family's stock diffusers pipeline of ``model_dir``, progress bar off."""
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def dpo_run(cls, model_dir, tmp_path_factory):
        return train(tmp_path_factory.mktemp("dpo") / "run", model_dir, cls.dpo_rounds)

    def test_online_dpo_runs(self, dpo_run):
        from rlfh.config.schema import load_config
        from rlfh.run.metrics import read_metrics
        from rollouts.log import RolloutLog

        cfg = load_config(dpo_run / "config.yaml")
        rows = read_metrics(dpo_run)
        assert [r["round"] for r in rows] == list(range(self.dpo_rounds))
        assert all(np.isfinite(r["reward/jpeg_compressibility/mean"]) and np.isfinite(r["loss/dpo"]) for r in rows)
        records = RolloutLog(dpo_run / "rollouts").records(["rollout_id", "round"])
        assert len(records) == self.dpo_rounds * cfg.rollout.samples_per_round

    def test_online_ddpo_runs_with_only_eta(self, model_dir, tmp_path):
        from rlfh.run.metrics import read_metrics

        extra = ("learner.loss=ddpo", "rollout.eta=1.0", "rollout.num_inference_steps=4")
        run = train(tmp_path / "ddpo", model_dir, self.ddpo_rounds, *extra)
        rows = read_metrics(run)
        assert [r["round"] for r in rows] == list(range(self.ddpo_rounds))
        assert all(np.isfinite(r["loss/ddpo"]) for r in rows)
        assert rows[0]["ddpo/recorded_logprob_max_diff"] < 1e-4  # the learner scores the sampler's SDE steps

    def test_the_runs_lora_loads_in_the_stock_pipeline_and_changes_its_output(self, dpo_run, model_dir):
        ckpt = dpo_run / "checkpoints" / (dpo_run / "checkpoints" / "latest").read_text()
        pipe = self.stock_pipeline(model_dir)

        def latents():
            g = torch.Generator().manual_seed(0)
            return pipe(
                "a photo of a person",
                generator=g,
                num_inference_steps=4,
                height=64,
                width=64,
                output_type="latent",
                **self.stock_kwargs,
            ).images

        base = latents()
        pipe.load_lora_weights(str(ckpt))
        assert (latents() - base).abs().max() > 1e-3

    def test_offline_dpo_from_the_log(self, dpo_run, model_dir, tmp_path):
        from rlfh.run.metrics import read_metrics

        run_dir = tmp_path / "offline"
        r = rlfh(
            "offline-dpo",
            "configs/offline_dpo.yaml",
            f"rollouts={dpo_run / 'rollouts'}",
            f"run_dir={run_dir}",
            f"model.path={model_dir}",
            "num_rounds=1",
            "logging.progress=false",
        )
        assert "offline DPO finished" in r.stdout
        rows = read_metrics(run_dir)
        assert len(rows) == 1 and rows[0]["pairs/count"] > 0 and np.isfinite(rows[-1]["loss/dpo"])
