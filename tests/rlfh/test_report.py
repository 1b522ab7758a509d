"""The evaluation report: grids with boxes and scores, plots, and index.html in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.rlfh.eval_helpers import tiny_eval

CHROMIUM = shutil.which("chromium") or (Path("/usr/bin/chromium") if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_report_files_and_links(tiny_model_dir):
    out, summary = tiny_eval(tiny_model_dir)
    page = (out / "index.html").read_text()
    srcs = re.findall(r"(?:src|href)='([^']+)'", page)
    assert srcs and all(not s.startswith(("http:", "https:", "/", "file:")) for s in srcs), srcs
    assert all((out / s).is_file() for s in srcs)
    for name in ("jpeg_compressibility", "brightest_box", "combined"):
        assert f"plots/dist-{name}.png" in srcs
    assert "plots/win_rates.png" in srcs and "grids/grid-000.png" in srcs
    assert "no face detected: 2" in page  # the not-computable reasons reach the page
    # the collapse table: each model's image diversity as in eval.json, and why there is no face similarity
    assert "Collapse and reward hacking" in page and "no configured reward exposes image embeddings" in page
    for side in ("model", "baseline"):
        assert f"{summary['collapse'][side]['image_diversity']['value']:.4g}" in page
    assert not re.search(r"https?://", page)


def test_grid_draws_boxes_where_the_reward_found_them(tiny_model_dir):
    from PIL import Image

    from rlfh.eval.report import CELL, LABEL_W, REGION_COLORS

    out, summary = tiny_eval(tiny_model_dir)
    grid = np.asarray(Image.open(out / "grids" / "grid-000.png").convert("RGB")).astype(int)
    rec = summary["samples"][0]
    face = rec["baseline"]["regions"]["face"][0]["box"]
    scale = CELL / summary["settings"]["width"]
    # the baseline column's first cell starts below the 26 px header and the row's 4 px margin
    x1, y1 = LABEL_W + round(face[0] * scale), 26 + 4 + round(face[1] * scale)
    y2 = 26 + 4 + round(face[3] * scale) - 2
    edge = grid[(y1 + y2) // 2, x1 : x1 + 3]  # the box's left edge, mid-height
    assert (np.abs(edge - np.array(REGION_COLORS["face"])).sum(axis=1) < 30).any(), edge


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get install -y chromium)")
def test_index_html_renders_in_headless_chromium(tiny_model_dir, tmp_path):
    from PIL import Image

    out, summary = tiny_eval(tiny_model_dir)
    base = [str(CHROMIUM), *CHROMIUM_FLAGS]
    profile = tempfile.mkdtemp(prefix="rlfh-chromium-")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            *base,
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            (out / "index.html").as_uri(),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    im = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert im.shape == (900, 1200) and im.std() > 20, "screenshot is blank"
    assert (im < 128).mean() > 0.01  # text, tables and plots, not just background

    # Every <img> decoded: a probe page next to index.html (same relative links) reports naturalWidth.
    probe = out / "_probe.html"
    script = (
        "<script>window.addEventListener('load',()=>{const p=document.createElement('pre');p.id='probe';"
        "p.textContent=JSON.stringify([...document.images].map(i=>[i.getAttribute('src'),i.naturalWidth]));"
        "document.body.appendChild(p);});</script>"
    )
    probe.write_text((out / "index.html").read_text().replace("</body>", script + "</body>"))
    try:
        dom = subprocess.run(
            [*base, f"--user-data-dir={profile}", "--dump-dom", probe.as_uri()],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    finally:
        probe.unlink()
        shutil.rmtree(profile, ignore_errors=True)
    m = re.search(r"<pre id=\"probe\">(.*?)</pre>", dom, re.S)
    assert m, dom[-2000:]
    images = json.loads(m.group(1).replace("&quot;", '"'))
    assert len(images) >= 5 and all(w > 0 for _, w in images), images


def test_report_needs_eval_json(tmp_path):
    from rlfh.eval.report import write_eval_report

    with pytest.raises(FileNotFoundError, match="eval.json"):
        write_eval_report(tmp_path)


def test_plots_follow_the_rewards_table_order(tiny_model_dir, tmp_path):
    from PIL import Image

    from rlfh.eval.report import write_win_rate_plot

    out, summary = tiny_eval(tiny_model_dir)
    page = (out / "index.html").read_text()
    srcs = re.findall(r"src='(plots/[^']+)'", page)
    dists = [s for s in srcs if s.startswith("plots/dist-")]
    assert dists == [f"plots/dist-{n}.png" for n in summary["rewards"] if f"plots/dist-{n}.png" in dists]
    assert srcs[-1] == "plots/win_rates.png"  # under its own heading, after the distributions
    assert page.index("<h2>Distributions</h2>") < page.index("<h2>Win rates</h2>") < page.index("<h2>Samples</h2>")

    # The win-rate bars read top-down in the table's order: first reward (0.9) above the second (0.1).
    rows = {"first": 0.9, "second": 0.1}
    fake = {"rewards": {n: {"win_rate": {"win_rate": w, "ci_low": w, "ci_high": w}} for n, w in rows.items()}}
    im = np.asarray(Image.open(tmp_path / write_win_rate_plot(tmp_path, fake)).convert("RGB")).astype(int)
    red = (im[..., 0] > 180) & (im[..., 1] < 150) & (im[..., 2] < 150)  # the model colour, alpha 0.75
    bar_rows = np.flatnonzero(red.any(axis=1))
    top, bottom = bar_rows[bar_rows < bar_rows.mean()], bar_rows[bar_rows > bar_rows.mean()]
    assert red[top].sum(axis=1).max() > 3 * red[bottom].sum(axis=1).max()


def test_no_detector_says_so_instead_of_an_empty_table(tiny_model_dir):
    from rlfh.eval.report import render_html

    _, summary = tiny_eval(tiny_model_dir)
    assert "<th>images checked</th>" in render_html(summary, [], {}, None, 10)
    none = {**summary, "regions": {side: {} for side in summary["regions"]}}
    page = render_html(none, [], {}, None, 10)
    assert "No detector ran" in page and "<th>images checked</th>" not in page
