"""HcP's pose priors as a per-round data source (``data.hcp_priors`` for the layer of ``model.hcp``; Wang et al., arXiv
2403.05239; the layer is
rlfh/learner/hcp.py, the loss rlfh/losses/hcp.py, the heatmaps rlfh/data/pose_prior.py).

Each round's scored samples get ``ScoredSamples.priors`` (N, 1, H/8, W/8): MediaPipe Pose heatmaps
of their images (``prior: samples``), or zeros that HG-DPO's real winners fill with theirs
(``prior: real``); the batch builder selects them with the rows of the pairs or samples.
"""

from __future__ import annotations

import numpy as np

from rlfh.data.sources.base import DataSource, SourceContext


class HcpPriors(DataSource):
    name = "hcp_priors"
    switch = "model.hcp.enabled"
    per_bucket = True  # each bucket's priors at its own latent size (image_hw)

    @staticmethod
    def section(cfg):
        return cfg.data.hcp_priors

    @classmethod
    def wanted(cls, cfg, ctx: SourceContext) -> bool:
        return bool(cfg.model.hcp.enabled)  # the priors feed the HcP layer's loss

    def __init__(self, cfg, ctx: SourceContext):
        hc = self.section(cfg)
        self.from_samples = hc.prior == "samples"
        self.needs_images = self.from_samples
        self.detect = None
        if self.from_samples:
            from rlfh.data.pose_prior import PosePriors

            self.detect = PosePriors(hc.sigma, hc.min_visibility)

    def annotate(self, samples) -> None:
        if self.from_samples:
            samples.priors = self.detect(samples.images)
        else:
            h, w = samples.image_hw
            samples.priors = np.zeros((len(samples), 1, h // 8, w // 8), np.float32)

    def close(self) -> None:
        if self.detect is not None:
            self.detect.close()
