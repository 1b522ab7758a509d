"""`rlfh train` refuses, before any actor starts, a config whose Ray requests the cluster cannot
satisfy, saying what it asked and what the cluster has; the per-tier configs fit their tier."""

import subprocess
import sys

import pytest

from rlfh.config.schema import load_config
from rlfh.recipes.capacity import ClusterTooSmall, check_cluster_fits, requests, total
from tests.conftest import REPO


def cfg(name, *overrides):
    return load_config(REPO / "configs" / name, list(overrides))


def node(cpu, gpu=0.0, **custom):
    return {"CPU": float(cpu), "GPU": float(gpu), **{k: float(v) for k, v in custom.items()}}


def cluster(*nodes):
    out = {}
    for n in nodes:
        for k, v in n.items():
            out[k] = out.get(k, 0.0) + v
    return out


def fits(c, nodes):
    check_cluster_fits(c, cluster(*nodes), list(nodes))


def test_six_gpu_config_on_one_gpu_is_refused_with_what_it_asked_and_what_there_is():
    one_gpu = [node(16, 1)]
    with pytest.raises(ClusterTooSmall) as e:
        fits(cfg("sdxl_faces_dpo.yaml"), one_gpu)
    msg = str(e.value)
    assert "asks Ray for 24 CPU, 6 GPU" in msg and "the cluster has 16 CPU, 1 GPU" in msg
    assert "4 x rollout actors (4 CPU, 1 GPU)" in msg and "1 x reward actor (4 CPU, 1 GPU)" in msg
    assert "configs/sdxl_1gpu_24gb.yaml" in msg


@pytest.mark.parametrize(
    "name, nodes",
    [
        ("tiny.yaml", [node(2)]),  # a laptop: 3 actors of 0.5 CPU
        ("sdxl_1gpu_24gb.yaml", [node(8, 1)]),  # one GPU: learner + reward actor on it
        ("sdxl_1gpu_80gb.yaml", [node(8, 1)]),
        ("sdxl_8gpu.yaml", [node(32, 8)]),
        ("sdxl_faces_dpo.yaml", [node(24, 6)]),
        ("sdxl_multinode.yaml", [node(32, 8, learner=4, reward=1), node(32, 8, rollout=8), node(32, 8, rollout=8)]),
    ],
)
def test_each_tier_config_fits_its_hardware(name, nodes):
    fits(cfg(name), nodes)


def test_one_gpu_tier_asks_for_one_gpu_and_colocates():
    c = cfg("sdxl_1gpu_24gb.yaml")
    assert c.resources.colocate and c.resources.gpus_per_reward_actor == 0
    assert total(requests(c))["GPU"] == 1
    with pytest.raises(ClusterTooSmall, match="has 8 CPU, 0 GPU"):
        fits(c, [node(8)])


def test_custom_resources_and_single_nodes_are_checked():
    multinode = cfg("sdxl_multinode.yaml")
    with pytest.raises(ClusterTooSmall, match="16 rollout"):  # one worker node short
        fits(multinode, [node(32, 8, learner=4, reward=1), node(32, 8, rollout=8)])
    with pytest.raises(ClusterTooSmall, match="0 rollout"):  # nodes started without the role resources
        fits(multinode, [node(64, 8), node(64, 8), node(64, 8)])
    # enough GPUs in total, but no node holds a whole one for a rollout actor
    with pytest.raises(ClusterTooSmall, match="no single node can hold 1 x rollout actors"):
        fits(cfg("tiny.yaml", "resources.gpus_per_rollout_actor=1"), [node(4, 0.5), node(4, 0.5)])


def test_a_reward_server_url_means_no_reward_actor():
    c = cfg("tiny.yaml", "reward_server.remote_url=http://127.0.0.1:8000")
    assert [r.role for r in requests(c)] == ["rollout actors", "learner ranks"]


@pytest.mark.slow
def test_rlfh_train_refuses_before_starting(tmp_path):
    """The real CLI on this (GPU-less) machine: exit 2 with the explanation, no model loaded."""
    from tests.test_end_to_end import clean_env

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlfh.cli.main",
            "train",
            "configs/sdxl_faces_dpo.yaml",
            f"run_dir={tmp_path / 'run'}",
            "logging.progress=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "rlfh: error: the config asks Ray for 24 CPU, 6 GPU" in r.stderr and "0 GPU" in r.stderr
