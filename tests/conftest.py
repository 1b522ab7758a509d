"""Shared fixtures: the tiny models (SDXL, SD1.5, SD3, FLUX.1) and small configs built on them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Defaults a user gets from the CLI; tests import modules directly, so set them here too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread per test process (read when torch is first imported; subprocesses and Ray workers inherit
# it). The tiny models' kernels are too small to gain from a second thread, and under `-n 2` two workers with
# two threads each on two cores stall in OpenMP's barriers: a DDPO learning test took 79 s alone with two
# threads, 33 s with one, and 213 s beside the other worker (docs/testing.md). tests/numerics.sh still runs
# the float-sensitive tests with OMP_NUM_THREADS=2.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The seeded tiny model, built once per cache directory (what `model.path: rlfh:tiny-sdxl` loads)."""
    from families import resolve_model_path

    return resolve_model_path("rlfh:tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd15_dir() -> str:
    """The seeded tiny SD1.5 model, built once per cache directory (`model.path: rlfh:tiny-sd15`)."""
    from families import resolve_model_path

    return resolve_model_path("rlfh:tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sd3_dir() -> str:
    """The seeded tiny SD3 model, built once per cache directory (`model.path: rlfh:tiny-sd3`)."""
    from families import resolve_model_path

    return resolve_model_path("rlfh:tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux_dir() -> str:
    """The seeded tiny FLUX.1 model, built once per cache directory (`model.path: rlfh:tiny-flux`)."""
    from families import resolve_model_path

    return resolve_model_path("rlfh:tiny-flux")


@pytest.fixture()
def tiny_cfg(tiny_model_dir, tmp_path):
    """configs/tiny.yaml shrunk for tests, with run_dir in tmp_path; extra overrides as arguments."""
    from rlfh.config.schema import load_config

    def make(*overrides: str):
        return load_config(
            REPO / "configs" / "tiny.yaml",
            [
                f"run_dir={tmp_path / 'run'}",
                f"model.path={tiny_model_dir}",
                "logging.wandb=false",
                "logging.progress=false",
                *overrides,
            ],
        )

    return make


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for one test module (4 logical CPUs: learner ranks, rollout and reward actors)."""
    import ray

    from rlfh.env import worker_runtime_env
    from rlfh.recipes.cluster import start_private_ray

    # loopback only: the learner ranks' rendezvous uses the Ray node's address
    start_private_ray(num_cpus=4, runtime_env=worker_runtime_env())
    yield ray
    ray.shutdown()


# The tests whose result depends on float rounding: equalities between float computations (bit for bit
# where the same code computes both sides in the same order, else at a stated tolerance) and learning
# tests (a gain over seeds). tests/numerics.sh runs them under other CPU kernels and thread counts.
NUMERICS_TESTS = (
    "tests/rollouts/test_sampler.py::test_sampler_equals_stock_diffusers_pipeline",
    "tests/rollouts/test_sampler.py::test_seeds_are_per_sample",
    "tests/families/test_sd15.py",
    "tests/test_sd15_end_to_end.py::test_dpo_raises_the_reward_on_sd15",
    "tests/rollouts/test_sampler_fast.py",
    "tests/rollouts/test_ddim_logprob.py",
    "tests/rollouts/test_refine.py",
    "tests/rollouts/test_fleet_refine.py",
    "tests/rollouts/test_log.py",
    "tests/rlfh/test_online_rl.py",
    "tests/rlfh/test_ddpo.py",
    "tests/rlfh/test_ddpo_branch.py",
    "tests/rlfh/test_learner.py",
    "tests/rlfh/test_learner_fast.py",
    "tests/rlfh/test_learner_options.py",
    "tests/rlfh/test_sampling_policy.py",
    "tests/rlfh/test_colocate_handover.py",
    "tests/rlfh/test_hcp.py",
    "tests/rlfh/test_region_pairs_tiny.py",
    "tests/rlfh/test_hgdpo_sdrecon.py",
    "tests/rewards/test_facescore.py",
    "tests/rewards/test_regions.py",
    "tests/test_weight_sync.py",
    "tests/test_colocate.py",
    "tests/test_resume.py",
    "tests/test_end_to_end.py::test_online_dpo_raises_reward_of_fresh_samples",
    "tests/test_online_rl_end_to_end.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[")[0].startswith(NUMERICS_TESTS):
            item.add_marker(pytest.mark.numerics)
    # Under `-n 2` (pytest-xdist; --dist loadfile keeps a file's module fixtures in one worker) the longest
    # files start first, then the other files with slow tests, then the many short files fill in at the end,
    # so that no worker idles while the other runs a long file alone. Each file's tests stay together and in
    # order. LONGEST: the files over about 4 minutes in the last two-worker run (docs/testing.md).
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], i)

    def rank(item):
        path = item.nodeid.split("::")[0]
        longest = LONGEST.index(path) if path in LONGEST else len(LONGEST)
        return longest, path not in slow_files, first[path]

    items.sort(key=rank)


LONGEST = (
    "tests/test_end_to_end.py",
    "tests/test_online_rl_end_to_end.py",
    "tests/test_doc_commands.py",
    "tests/test_resume.py",
    "tests/test_fault_tolerance.py",
    "tests/reliability/test_chaos.py",
    "tests/test_data_parallel.py",
    "tests/test_learner_recovery.py",
    "tests/test_sd3_end_to_end.py",
    "tests/test_flux_end_to_end.py",
)
