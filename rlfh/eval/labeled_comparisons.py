"""A labeled rollout log as the comparisons ``rlfh eval-rewards`` scores (rlfh/eval/reward_agreement.py).

Each labeler's last label of a task (:func:`rlfh.labeling.agreement.latest_labels`) is one comparison of
the task's images: the winner ranked 1, the loser last, any other image shown between them (best-worst
mode over more than two images) in the middle; a tie ranks every image equal. The images are the log's own
bytes, written once into ``image_dir`` as ``<rollout_id>.png`` so that every reward reads the file a
person saw.
"""

from __future__ import annotations

from pathlib import Path

from rlfh.eval.reward_agreement import Comparison


def ranks_of(records: tuple[str, ...], winner: str | None, loser: str | None) -> tuple[int, ...]:
    """1 for the winner, 3 for the loser, 2 for the rest; all equal for a tie (winner None)."""
    if winner is None:
        return tuple(1 for _ in records)
    return tuple(1 if r == winner else 3 if r == loser else 2 for r in records)


def comparisons_from_labels(log_dir: str | Path, image_dir: str | Path) -> list[Comparison]:
    """The labeled log's comparisons, its labeled images written to ``image_dir``.

    Raises:
        ValueError: the log has no labels yet.
    """
    from rlfh.labeling.agreement import latest_labels
    from rlfh.labeling.table import LabelsTable
    from rollouts.log import RolloutLog

    labels = latest_labels(LabelsTable(log_dir))
    if not labels:
        raise ValueError(f"{log_dir}: no labels yet (rlfh label {log_dir} writes them)")
    wanted = {r for lab in labels for r in lab.records}
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    prompts = {}
    for rec in RolloutLog(log_dir).records(["rollout_id", "prompt", "image"]):
        if rec["rollout_id"] in wanted:
            if rec["image"] is None:
                raise ValueError(f"{log_dir}: record {rec['rollout_id']} was labeled but its image is not in the log")
            (image_dir / f"{rec['rollout_id']}.png").write_bytes(rec["image"])
            prompts[rec["rollout_id"]] = rec["prompt"]
    return [
        Comparison(
            prompts[lab.records[0]],
            tuple(image_dir / f"{r}.png" for r in lab.records),
            ranks_of(lab.records, lab.winner, lab.loser),
            n,
        )
        for n, lab in enumerate(labels, start=1)
    ]
