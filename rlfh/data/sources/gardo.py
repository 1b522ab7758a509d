"""GARDO's per-sample fields as a per-round data source (``gardo``; the formulas: rlfh/losses/gardo.py).

Each online round's scored samples get ``ScoredSamples.kl_gate``, the samples whose trained score the
``gardo.uncertainty_rewards`` disagree with most (they get the KL term), and
``ScoredSamples.embeddings``, what the diversity-aware advantage compares within a prompt group: face identity
embeddings by the training reward that serves them (``diversity: identity``; the collapse metric's, one per image,
a NaN row for an image without a face) or the images' 64 x 64 pixels (``diversity: pixels``). The batch builders
select both with their rows (rlfh/data/pairs.py).
"""

from __future__ import annotations

from rlfh.data.sources.base import DataSource, SourceContext


class Gardo(DataSource):
    name = "gardo"
    needs_images = False  # set per run: the diversity embeddings read the images

    @staticmethod
    def section(cfg):
        return cfg.gardo

    @classmethod
    def wanted(cls, cfg, ctx: SourceContext) -> bool:
        g = cls.section(cfg)
        return g.kl_gate_fraction is not None or g.diversity != "off"

    def __init__(self, cfg, ctx: SourceContext):
        self.g, self.scorer = self.section(cfg), ctx.scorer
        self.needs_images = self.g.diversity != "off"
        if self.g.diversity == "identity" and self.scorer is None:
            raise ValueError(
                "gardo.diversity=identity embeds faces with the training rewards' scorer, which only the "
                "online loop has; use diversity=pixels or off"
            )

    def annotate(self, samples) -> None:
        from rlfh.losses.gardo import face_boxes, kl_gate, per_image_embeddings, pixel_embeddings, reward_uncertainty

        g = self.g
        if g.kl_gate_fraction is not None:
            if samples.values is None:
                raise ValueError("gardo.kl_gate_fraction needs every reward's value per sample (ScoredSamples.values)")
            aux = {n: samples.values[n] for n in g.uncertainty_rewards}
            samples.kl_gate = kl_gate(reward_uncertainty(samples.scores, aux), g.kl_gate_fraction)
        if g.diversity == "pixels":
            samples.embeddings = pixel_embeddings(samples.images)
        elif g.diversity == "identity":
            embedded = self.scorer.face_embeddings(samples.images, face_boxes(samples.regions))
            samples.embeddings = per_image_embeddings(embedded, len(samples))  # None: factors 1, nothing shaped
