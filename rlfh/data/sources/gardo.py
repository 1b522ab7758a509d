"""GARDO's per-sample fields as a per-round data source (``gardo``; the formulas: rlfh/losses/gardo.py).

Each online round's scored samples get ``ScoredSamples.kl_gate``, the samples whose trained score the
``gardo.uncertainty_rewards`` and the trained score of the ``gardo.uncertainty_augmentations`` copies (scored by the
run's scorer, online) disagree with most (they get the KL term; the fraction moved by the adaptive gate with
``gardo.kl_gate_range``, once per call: per bucket with ``rollout.resolutions``), and
``ScoredSamples.embeddings``, what the diversity-aware advantage compares within a prompt group: face identity
embeddings by the training reward that serves them (``diversity: identity``; the collapse metric's, one per image,
a NaN row for an image without a face) or the images' 64 x 64 pixels (``diversity: pixels``). The batch builders
select both with their rows (rlfh/data/pairs.py).
"""

from __future__ import annotations

from rlfh.data.sources.base import DataSource, SourceContext


class Gardo(DataSource):
    name = "gardo"
    switch = "gardo"
    per_bucket = True  # per-sample fields; the gate and its adaptive fraction act per bucket
    needs_images = False  # set per run: the diversity embeddings read the images

    @staticmethod
    def section(cfg):
        return cfg.gardo

    @classmethod
    def wanted(cls, cfg, ctx: SourceContext) -> bool:
        g = cls.section(cfg)
        return g.kl_gate_fraction is not None or g.diversity != "off"

    def __init__(self, cfg, ctx: SourceContext):
        from rlfh.losses.gardo import AdaptiveGate

        self.g, self.scorer, self.normalization = self.section(cfg), ctx.scorer, cfg.rewards_normalization
        self.needs_images = self.g.diversity != "off" or bool(self.g.uncertainty_augmentations)
        for key, on in (
            ("diversity=identity", self.g.diversity == "identity"),
            ("uncertainty_augmentations", bool(self.g.uncertainty_augmentations)),
        ):
            if on and self.scorer is None:
                raise ValueError(
                    f"gardo.{key} scores the images with the training rewards' scorer, which only the online loop "
                    "has; drop it offline (diversity=pixels embeds without one)"
                )
        r = self.g.kl_gate_range
        self.gate = AdaptiveGate(self.g.kl_gate_fraction, r[0], r[1]) if r else None

    def augmented_scores(self, samples) -> dict:
        """{augment/<name>: the trained score of each sample's augmented copy}, scored by the run's scorer and
        combined as the samples' scores are (rlfh.data.pairs.learner_scores)."""
        from rlfh.data.pairs import learner_scores
        from rlfh.losses.gardo import augment

        out = {}
        for name in self.g.uncertainty_augmentations:
            scored = self.scorer.score(augment(samples.images, name), list(samples.prompts))
            out[f"augment/{name}"] = learner_scores(
                scored.values(), scored.weights, samples.groups, self.normalization
            )[0]
        return out

    def annotate(self, samples) -> None:
        from rlfh.losses.gardo import face_boxes, kl_gate, per_image_embeddings, pixel_embeddings, reward_uncertainty

        g = self.g
        if g.kl_gate_fraction is not None:
            if samples.values is None:
                raise ValueError("gardo.kl_gate_fraction needs every reward's value per sample (ScoredSamples.values)")
            aux = {n: samples.values[n] for n in g.uncertainty_rewards}
            aux.update(self.augmented_scores(samples))
            u = reward_uncertainty(samples.scores, aux)
            samples.kl_gate = kl_gate(u, g.kl_gate_fraction if self.gate is None else self.gate.update(u))
        if g.diversity == "pixels":
            samples.embeddings = pixel_embeddings(samples.images)
        elif g.diversity == "identity":
            embedded = self.scorer.face_embeddings(samples.images, face_boxes(samples.regions))
            samples.embeddings = per_image_embeddings(embedded, len(samples))  # None: factors 1, nothing shaped

    def state(self) -> dict:
        return {} if self.gate is None else {"fraction": self.gate.fraction, "history": list(self.gate.history)}

    def load_state(self, state: dict) -> None:
        """The adaptive gate where the checkpoint left it (a resumed run gates as the uninterrupted one)."""
        if self.gate is not None:
            self.gate.fraction = float(state.get("fraction", self.g.kl_gate_fraction))
            self.gate.history = [float(m) for m in state.get("history", [])]

    def extend(self, batch, rnd):
        """The batch as it is; the adaptive gate's fraction (``gardo/kl_gate_fraction``) among the round's metrics."""
        return batch, ({} if self.gate is None else {"gardo/kl_gate_fraction": self.gate.fraction})
