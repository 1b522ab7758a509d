"""Preference pairs from people's labels (the labels table beside a rollout log), for training.

Every label that counts (:meth:`rlfh.labeling.table.LabelsTable.labels`: not undone) is one pair,
(winner, loser): the best and the worst of a best-worst task, the preferred image of a pairwise or
win-tie-lose task and the other one. Ties are dropped, as a tied score gives no DPO pair. Two
labelers' labels of the same task are two pairs (opposite ones cancel in the loss, as they should);
one labeler's labels of one task count once, the last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rlfh.data.pairs import Pair
from rlfh.labeling.agreement import latest_labels
from rlfh.labeling.table import LabelsTable

HUMAN_MARGIN = 1.0  # a label says which image is preferred, not by how much


def human_pairs(log_dir: str | Path, rollout_ids: Sequence[str]) -> tuple[list[Pair], dict[str, float]]:
    """Pairs of indices into ``rollout_ids`` (the records being trained on) from the log's labels.

    Returns:
        (pairs, stats): ``labels/count`` labels that count, ``labels/ties`` dropped ties,
        ``labels/not_in_batch`` labels naming a record not in ``rollout_ids``, ``labels/labelers``.

    Raises:
        ValueError: the table holds no label, or none that makes a pair here (naming the file).
    """
    table = LabelsTable(log_dir)
    labels = latest_labels(table)  # two servers racing on one labeler's task: the last label counts
    if not labels:
        raise ValueError(f"labels=human: no labels in {table.path}; label the log first (rlfh label {log_dir})")
    where = {rid: i for i, rid in enumerate(rollout_ids)}
    pairs, ties, missing = [], 0, 0
    for lab in labels:
        if lab.tie:
            ties += 1
        elif lab.winner in where and lab.loser in where:
            pairs.append(Pair(where[lab.winner], where[lab.loser], HUMAN_MARGIN))
        else:
            missing += 1
    if not pairs:
        raise ValueError(
            f"labels=human: the {len(labels)} labels of {table.path} make no pair: {ties} ties (dropped), "
            f"{missing} naming records that are not trained on (region-pair images, or another log's)"
        )
    stats = {
        "labels/count": float(len(labels)),
        "labels/ties": float(ties),
        "labels/not_in_batch": float(missing),
        "labels/labelers": float(len({lab.labeler for lab in labels})),
    }
    return pairs, stats
