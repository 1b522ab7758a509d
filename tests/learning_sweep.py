"""The spread of each learning test's gain over seeds and CPU numerics, from which its margin is taken.

A learning test runs one trajectory (seed 0) and asserts a gain above a margin. Another CPU's kernels round
differently and move that trajectory as another seed would, so a margin that holds on any machine comes from
the distribution over seeds and numerics, not from one run: this script prints each seed's gain, their mean,
standard deviation and minimum. The tests write these numbers beside their margins; a margin is at most half
the smallest gain measured (and below mean - 2 sd), so that a trajectory on an unseen CPU passes unless it is
further out than any seen.

    python -m tests.learning_sweep ddpo_window --seeds 0 1 2 3 4
    ATEN_CPU_CAPABILITY=default python -m tests.learning_sweep nft --seeds 0 1 2
    python -m tests.learning_sweep dpo --model rlfh:tiny-sd3 --seeds 0 1 2
    python -m tests.learning_sweep --list
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def runs() -> dict:
    import tempfile
    from pathlib import Path

    from tests import test_online_rl_end_to_end as e2e
    from tests import test_sd15_end_to_end as sd15
    from tests.families import test_sd3_learning as flow_draft
    from tests.rlfh import gardo_collapse, test_ddpo, test_losses_draft, test_online_rl

    def cli(loss):  # the whole product: `rlfh train` with Ray and DeepSpeed, then fresh samples at fixed seeds
        return lambda d, s, rounds=e2e.LEARNING.get(loss, (10,))[0]: e2e.e2e_gain(
            d, Path(tempfile.mkdtemp()) / "run", loss, int(rounds), seed=s
        )

    def dpo(d, s, rounds=sd15.DPO_ROUNDS, **kw):  # kw: config keys, learner__lr="1e-3" for learner.lr
        before, after = sd15.dpo_gain(d, s, int(rounds), *(f"{k.replace('__', '.')}={v}" for k, v in kw.items()))
        return after - before

    return {
        "dpo": dpo,
        "ddpo": lambda d, s, **kw: test_ddpo.ddpo_learning_gain(d, None, seed=s, **kw),
        # a flow model's DDPO/GRPO: the family's own sampler made stochastic (the Flow-GRPO SDE step)
        "ddpo_flow": lambda d, s, **kw: test_ddpo.ddpo_learning_gain(d, None, seed=s, scheduler="default", **kw),
        "ddpo_window": lambda d, s, **kw: test_ddpo.ddpo_learning_gain(d, 2, seed=s, **kw),
        "ddpo_branch": lambda d, s, **kw: test_ddpo.ddpo_learning_gain(
            d, 2, branch=True, groups=4, seed=s, **{"rounds": 8, **kw}
        ),
        "dppo": lambda d, s: test_ddpo.trust_region_run(d, "dppo", seed=s)[0],
        "guard": lambda d, s: test_ddpo.trust_region_run(d, "guard", seed=s)[0],
        "nft": lambda d, s, **kw: test_online_rl.online_learning_gain(d, "nft", seed=s, **kw),
        "awm": lambda d, s, **kw: test_online_rl.online_learning_gain(d, "awm", seed=s, **kw),
        "e2e_nft": cli("nft"),
        "e2e_awm": cli("awm"),
        **{
            f"draft_{v}": lambda d, s, v=v, **kw: test_losses_draft.draft_learning_gain(d, v, seed=s, **kw)
            for v in ("refl", "draft_k", "alignprop", "draft_lv")
        },
        # on a flow model: its Euler sampler, and gradient through more than the last (sigma ~ 0) step
        **{
            f"flow_draft_{v}": lambda d, s, v=v, **kw: test_losses_draft.draft_learning_gain(
                d, v, seed=s, scheduler="default", overrides=flow_draft.FLOW_DRAFT[v], **kw
            )
            for v in ("refl", "draft_k")
        },
        "gardo_spread": lambda d, s, **kw: gardo_collapse.spread_kept(d, seed=s, **kw)[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="keyword=value arguments of the run (e.g. lr=5e-3 epochs=2)")
    ap.add_argument("--model", default="rlfh:tiny-sdxl", help="the tiny model trained (rlfh:tiny-sd3, ...)")
    args = ap.parse_args()
    table = runs()
    if args.list or args.name not in table:
        print("learning runs:", " ".join(table))
        return
    from families import resolve_model_path

    model = resolve_model_path(args.model)
    numerics = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS") if k in os.environ}
    kwargs = {k: (int(v) if v.isdigit() else v) for k, v in (a.split("=", 1) for a in args.set)}
    gains = []
    for seed in args.seeds:
        t0 = time.time()
        gains.append(table[args.name](model, seed, **kwargs))
        print(f"[sweep] {args.name} seed {seed}: gain {gains[-1]:+.4f} ({time.time() - t0:.0f} s)", flush=True)
    sd = statistics.stdev(gains) if len(gains) > 1 else float("nan")
    print(
        f"[sweep] {args.name} on {args.model} {numerics or 'default numerics'}: gains {[round(g, 4) for g in gains]}, "
        f"mean {statistics.mean(gains):+.4f}, sd {sd:.4f}, min {min(gains):+.4f}"
    )


if __name__ == "__main__":
    main()
