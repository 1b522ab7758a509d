"""The labeling page in a real browser: Debian's chromium driven by Playwright, on the tiny model's own
rollout log. Keyboard shortcuts, the mouse, undo, skip, a second labeler, the server killed and
restarted mid-session (the labeler resumes where they stopped), then offline DPO trains on the labels.

Playwright drives the system chromium (``executable_path``); nothing is downloaded. Set
``RLFH_LABELING_SCREENSHOT=PATH`` to also save the page's screenshot there (docs/images/labeling.png).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rlfh.labeling.table import LabelsTable
from tests.labeling.logs import TINY_PROMPTS, write_tiny_model_log

CHROMIUM = "/usr/bin/chromium"

pytest.importorskip("playwright", reason="the test extra installs playwright (the system chromium is its browser)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelServer:
    """``rlfh label`` as a user starts it, in its own process (so it can be killed without warning)."""

    def __init__(self, log_dir: Path, port: int, tmp: Path):
        self.log_dir, self.port, self.tmp, self.proc = log_dir, port, tmp, None

    def start(self) -> None:
        from tests.test_end_to_end import REPO, clean_env

        out = open(self.tmp / f"server-{time.time_ns()}.log", "wb")
        cmd = [sys.executable, "-m", "rlfh.cli.main", "label", str(self.log_dir), "--port", str(self.port)]
        self.proc = subprocess.Popen([*cmd, "--labeler", "ann"], cwd=REPO, env=clean_env(), stdout=out, stderr=out)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.tmp / out.name).read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=5).read()
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("rlfh label did not answer within 120 s")

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown handler runs
        self.proc.wait(30)


@pytest.fixture(scope="module")
def tiny_log(tiny_model_dir, tmp_path_factory):
    return write_tiny_model_log(tmp_path_factory.mktemp("tiny-log") / "rollouts", tiny_model_dir)


def ids_on(page) -> list[str]:
    return page.locator("figure.item").evaluate_all("els => els.map(e => e.dataset.id)")


def keys(page, *pressed: str) -> None:
    """Press keys; the last one submits, so wait for the page it leads to."""
    for k in pressed[:-1]:
        page.keyboard.press(k)
    with page.expect_navigation():
        page.keyboard.press(pressed[-1])


def test_labeling_session_in_chromium_then_offline_dpo(tiny_log, tiny_model_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    log = Path(shutil.copytree(tiny_log, tmp_path / "rollouts"))
    server = LabelServer(log, free_port(), tmp_path)
    server.start()
    url = f"http://127.0.0.1:{server.port}/?labeler=ann"
    want = []  # (winner, loser) in the order they should count
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1150, "height": 620})
            page.set_default_timeout(60_000)
            page.goto(url)
            expect(page.locator("#progress")).to_have_text("0 / 4 labeled by ann")
            expect(page.locator("#prompt")).to_have_text(TINY_PROMPTS[0])
            # rewards and boxes are hidden until asked for
            expect(page.locator(".rewards").first).to_be_hidden()
            page.keyboard.press("r")
            expect(page.locator(".rewards").first).to_be_visible()
            page.keyboard.press("r")
            expect(page.locator(".rewards").first).to_be_hidden()
            page.keyboard.press("b")
            expect(page.locator(".box").first).to_be_visible()
            ids = ids_on(page)
            shot = tmp_path / "labeling.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("RLFH_LABELING_SCREENSHOT"):
                shutil.copy(shot, os.environ["RLFH_LABELING_SCREENSHOT"])
            keys(page, "1", "3")  # best: image 1, worst: image 3
            want.append((ids[0], ids[2]))
            expect(page.locator("#progress")).to_have_text("1 / 4 labeled by ann")
            expect(page.locator("#prompt")).to_have_text(TINY_PROMPTS[1])
            ids = ids_on(page)
            keys(page, "2", "1")
            keys(page, "u")  # undo: task 2 again, unlabeled
            expect(page.locator("#prompt")).to_have_text(TINY_PROMPTS[1])
            expect(page.locator("#progress")).to_have_text("1 / 4 labeled by ann")
            keys(page, "3", "2")
            want.append((ids[2], ids[1]))
            keys(page, "s")  # skip task 3: it comes back after task 4
            expect(page.locator("#prompt")).to_have_text(TINY_PROMPTS[3])

            server.kill()  # mid-session, without warning
            server.start()
            page.goto(url)  # the labeler reopens the page: where they stopped
            expect(page.locator("#prompt")).to_have_text(TINY_PROMPTS[3])
            expect(page.locator("#progress")).to_have_text("2 / 4 labeled by ann")
            ids = ids_on(page)
            page.locator(f'figure[data-id="{ids[1]}"] input[name=winner]').check()  # by mouse this time
            page.locator(f'figure[data-id="{ids[0]}"] input[name=loser]').check()
            with page.expect_navigation():
                page.locator("#save").click()
            want.append((ids[1], ids[0]))
            expect(page.locator("#prompt")).to_have_text(TINY_PROMPTS[2])  # the skipped task, last
            ids = ids_on(page)
            keys(page, "1", "2")
            want.append((ids[0], ids[1]))
            expect(page.locator("#progress")).to_have_text("4 / 4 labeled by ann")
            expect(page.locator("#prompt")).to_have_text("All tasks labeled.")

            page.goto(url.replace("ann", "bob"))  # a second labeler on the same log: a tie, dropped in training
            expect(page.locator("#progress")).to_have_text("0 / 4 labeled by bob")
            keys(page, "0")
            expect(page.locator("#progress")).to_have_text("1 / 4 labeled by bob")
            browser.close()
    finally:
        server.kill()
    labels = LabelsTable(log).labels()
    assert [(lab.winner, lab.loser) for lab in labels if lab.labeler == "ann"] == want
    assert [lab.tie for lab in labels if lab.labeler == "bob"] == [True]
    assert shot.read_bytes()[:4] == b"\x89PNG"

    from rlfh.run.metrics import read_metrics
    from tests.test_end_to_end import rlfh

    run_dir = tmp_path / "run"
    rlfh(
        "offline-dpo",
        "configs/offline_dpo.yaml",
        f"rollouts={log}",
        f"run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        "labels=human",
        "num_rounds=1",
        "logging.progress=false",
    )
    (row,) = read_metrics(run_dir)
    assert row["pairs/count"] == 4 and row["labels/count"] == 5 and row["labels/ties"] == 1
    assert row["labels/labelers"] == 2 and row["learner/steps"] > 0
    assert (run_dir / "checkpoints" / "round-000001" / "pytorch_lora_weights.safetensors").is_file()
