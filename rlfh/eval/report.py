"""The HTML report of an evaluation: what a user opens to see what training changed.

``write_eval_report(out_dir)`` reads ``out_dir/eval.json`` (written by :func:`rlfh.eval.evaluate.evaluate`)
and the sample images next to it, and writes:

* ``grids/grid-NNN.png``: one row per (prompt, seed), baseline and model side by side, with the
  face / hand / other boxes the rewards found and every reward's value drawn on each image;
* ``plots/dist-<reward>.png``: each reward's distribution per model (matplotlib, Agg backend);
* ``plots/win_rates.png``: win rates with their 95% intervals, when there is a baseline;
* ``index.html``: the tables (rewards, detections, region rewards per image and per detection, region
  count and size with the change vs the baseline, per-style means, collapse and hacking metrics per
  model) and the pictures, with relative links and no external resources, so the folder can be
  copied or served as is.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

CELL = 256  # px, longest image side in the grids: SDXL's 1024 px shrinks, the tiny model's 64 px grows
ROWS_PER_GRID = 6
LABEL_W = 240
REGION_COLORS = {"face": (40, 200, 60), "hand": (255, 140, 0)}
OTHER_COLOR = (60, 120, 255)
SIDE_COLORS = {"baseline": "#8c8c8c", "model": "#d62728"}


def slug(name: str) -> str:
    """A file-name-safe version of a reward name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "reward"


def _font(size: int = 12):
    from PIL import ImageFont

    try:  # Pillow >= 10.1 ships a scalable default font
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def annotate(image_path: Path, side: dict[str, Any], reward_names: list[str]):
    """One grid cell: the image scaled to :data:`CELL`, its boxes, and its scores underneath."""
    from PIL import Image, ImageDraw

    im = Image.open(image_path).convert("RGB")
    scale = CELL / max(im.size)
    # nearest keeps the tiny model's pixels honest when enlarging; Lanczos for shrinking real images
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.NEAREST if scale > 1 else Image.LANCZOS)
    font = _font(12)
    lines = [
        f"{n}: {_fmt(side['scores'][n])}" + (f" ({side['reasons'][n]})" if n in side["reasons"] else "")
        for n in reward_names
    ]
    lines.append(f"combined: {_fmt(side['combined'])}")
    cell = Image.new("RGB", (CELL, CELL + 16 * len(lines) + 6), "white")
    cell.paste(im, ((CELL - im.width) // 2, 0))
    draw = ImageDraw.Draw(cell)
    off = (CELL - im.width) // 2
    for region, dets in side["regions"].items():
        color = REGION_COLORS.get(region, OTHER_COLOR)
        for d in dets:
            x1, y1, x2, y2 = (v * scale for v in d["box"])
            draw.rectangle([x1 + off, y1, x2 + off, y2], outline=color, width=3)
            label = f"{region} {d['confidence']:.2f}"
            # filled tag above the box (inside when at the top edge): readable on any image
            ty = y1 - 15 if y1 >= 15 else y1
            tb = draw.textbbox((x1 + off, ty), label, font=font)
            draw.rectangle([tb[0] - 1, tb[1] - 1, tb[2] + 2, tb[3] + 1], fill=color)
            draw.text((x1 + off, ty), label, fill=(255, 255, 255), font=font)
    for i, line in enumerate(lines):
        draw.text((4, CELL + 4 + 16 * i), line[:40], fill=(0, 0, 0), font=font)
    return cell


def _wrap(text: str, width: int = 34) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + ([cur] if cur else [])


def write_grids(out_dir: Path, summary: dict[str, Any], max_samples: int = 96) -> list[str]:
    """Side-by-side grid pages; returns their paths relative to ``out_dir``."""
    from PIL import Image, ImageDraw

    sides = [s for s in ("baseline", "model") if s in summary["models"]]
    names = [n for n in summary["rewards"] if n != "combined"]
    samples = summary["samples"][:max_samples]
    (out_dir / "grids").mkdir(exist_ok=True)
    font, head = _font(13), _font(15)
    paths = []
    for page, start in enumerate(range(0, len(samples), ROWS_PER_GRID)):
        rows = []
        for rec in samples[start : start + ROWS_PER_GRID]:
            cells = [annotate(out_dir / rec[s]["image"], rec[s], names) for s in sides]
            row = Image.new(
                "RGB", (LABEL_W + CELL * len(cells) + 8 * len(cells), max(c.height for c in cells) + 8), "white"
            )
            draw = ImageDraw.Draw(row)
            text = _wrap(rec["prompt"]) + [f"seed {rec['seed']}  (#{rec['index']})"]
            if "baseline" in rec:
                a, b = rec["model"]["combined"], rec["baseline"]["combined"]
                verdict = (
                    "n/a" if a is None or b is None else "model wins" if a > b else "tie" if a == b else "baseline wins"
                )
                text.append(f"combined: {verdict}")
            for i, line in enumerate(text):
                draw.text((6, 6 + 17 * i), line, fill=(20, 20, 20), font=font)
            for j, c in enumerate(cells):
                row.paste(c, (LABEL_W + j * (CELL + 8), 4))
            rows.append(row)
        header_h = 26
        grid = Image.new("RGB", (rows[0].width, header_h + sum(r.height for r in rows)), (235, 235, 235))
        draw = ImageDraw.Draw(grid)
        for j, s in enumerate(sides):
            draw.text((LABEL_W + j * (CELL + 8) + 4, 5), s, fill=(0, 0, 0), font=head)
        y = header_h
        for r in rows:
            grid.paste(r, (0, y))
            y += r.height
        rel = f"grids/grid-{page:03d}.png"
        grid.save(out_dir / rel)
        paths.append(rel)
    return paths


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in CI
    import matplotlib.pyplot as plt

    return plt


def write_distribution_plots(out_dir: Path, summary: dict[str, Any]) -> dict[str, str]:
    """A histogram per reward, one colour per model; returns {reward: relative png path}."""
    plt = _plt()
    (out_dir / "plots").mkdir(exist_ok=True)
    sides = list(summary["models"])
    paths = {}
    for name in summary["rewards"]:
        vals = {s: [v for v in (_value(r[s], name) for r in summary["samples"]) if v is not None] for s in sides}
        if not any(vals.values()):
            continue  # nothing computable: the table says why
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        allv = [v for vs in vals.values() for v in vs]
        bins = min(30, max(5, len(allv) // 3))
        rng = (min(allv), max(allv)) if min(allv) < max(allv) else (min(allv) - 0.5, max(allv) + 0.5)
        for s in sides:
            if vals[s]:
                ax.hist(
                    vals[s], bins=bins, range=rng, alpha=0.55, color=SIDE_COLORS[s], label=f"{s} (n={len(vals[s])})"
                )
                ax.axvline(sum(vals[s]) / len(vals[s]), color=SIDE_COLORS[s], linestyle="--", linewidth=1.5)
        ax.set_title(name)
        ax.set_xlabel("reward (higher is better)")
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
        fig.tight_layout()
        rel = f"plots/dist-{slug(name)}.png"
        fig.savefig(out_dir / rel)
        plt.close(fig)
        paths[name] = rel
    return paths


def _value(side: dict[str, Any], name: str) -> float | None:
    return side["combined"] if name == "combined" else side["scores"].get(name)


def write_win_rate_plot(out_dir: Path, summary: dict[str, Any]) -> str | None:
    """Horizontal bars of win rate with 95% CI; None when there is no baseline or nothing compared."""
    rows = [
        (n, e["win_rate"])
        for n, e in summary["rewards"].items()
        if "win_rate" in e and e["win_rate"]["win_rate"] is not None
    ]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 0.5 + 0.45 * len(rows)), dpi=100)
    ys = list(range(len(rows)))
    rates = [w["win_rate"] for _, w in rows]
    err = [
        [r - (w["ci_low"] if w["ci_low"] is not None else r) for r, (_, w) in zip(rates, rows)],
        [(w["ci_high"] if w["ci_high"] is not None else r) - r for r, (_, w) in zip(rates, rows)],
    ]
    ax.barh(ys, rates, xerr=err, color=SIDE_COLORS["model"], alpha=0.75, capsize=3)
    ax.axvline(0.5, color="black", linewidth=1)
    ax.set_yticks(ys, [n for n, _ in rows])
    ax.invert_yaxis()  # bars top-down in the Rewards table's order (barh stacks the first at the bottom)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate of model over baseline (ties = 0.5)")
    fig.tight_layout()
    (out_dir / "plots").mkdir(exist_ok=True)
    fig.savefig(out_dir / "plots" / "win_rates.png")
    plt.close(fig)
    return "plots/win_rates.png"


CSS = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 20px}
td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}th{background:#f0f0f0}
img{border:1px solid #ddd;margin:4px}.plots img{width:420px}.grids img{max-width:100%}
.small{color:#666;font-size:12px}"""


def _ci(st: dict[str, Any]) -> str:
    if st.get("mean", st.get("win_rate")) is None:
        return "n/a"
    val = st["mean"] if "mean" in st else st["win_rate"]
    ci = "" if st["ci_low"] is None else f" [{st['ci_low']:.4g}, {st['ci_high']:.4g}]"
    return f"{val:.4g}{ci}"


def _missing(st: dict[str, Any]) -> str:
    reasons = "; ".join(f"{html.escape(r)}: {c}" for r, c in st["not_computable"].items())
    return f"{st['not_computable_rate']:.0%}" + (f" <span class=small>({reasons})</span>" if reasons else "")


COLLAPSE_ROWS = (
    (
        "face_identity_sim",
        "face identity similarity",
        "mean pairwise cosine similarity of face embeddings across seeds and prompts; 1 = one face everywhere",
    ),
    (
        "image_diversity",
        "image diversity within a prompt",
        "mean pairwise RMS pixel distance (64x64, [0, 1]) between seeds of a prompt; 0 = the seed no longer matters",
    ),
    (
        "reward_gap",
        "held-out reward gap",
        "combined reward on training prompts minus on these prompts; growing = reward won on training prompts only",
    ),
)


def _collapse_table(summary: dict[str, Any], sides: list[str]) -> list[str]:
    """The collapse and hacking metrics per model, each value or 'n/a' with its reason."""
    e = html.escape
    collapse = summary.get("collapse")
    if not collapse:
        return []
    out = ["<h2>Collapse and reward hacking</h2><table><tr><th>metric</th>"]
    out += [f"<th>{s}</th>" for s in sides]
    out.append("<th>what it measures</th></tr>")
    for key, label, what in COLLAPSE_ROWS:
        cells = []
        for s in sides:
            m = collapse.get(s, {}).get(key)
            if m is None:
                cells.append("<td>n/a</td>")
            elif m["value"] is None:
                cells.append(f"<td>n/a <span class=small>({e(str(m['reason']))})</span></td>")
            else:
                src = f" <span class=small>({e(m['source'])})</span>" if m.get("source") else ""
                cells.append(f"<td>{m['value']:.4g}{src}</td>")
        out.append(f"<tr><td>{e(label)}</td>{''.join(cells)}<td class=small>{e(what)}</td></tr>")
    out.append("</table>")
    return out


SIZE_ROWS = (
    ("per_image", "detections per image"),
    ("images_with_detection_rate", "images with one or more"),
    ("area_share", "mean box area / image area"),
    ("largest_share", "mean largest box area / image area"),
)


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _region_size_table(summary: dict[str, Any], sides: list[str]) -> list[str]:
    """Count and size of the detected regions per model, and the change vs the baseline (FaceScore's drift)."""
    e = html.escape
    size = summary.get("region_size") or {}
    if not size:
        return []
    out = ["<h2>Region count and size</h2><table><tr><th>region</th><th>metric</th>"]
    out += [f"<th>{s}</th>" for s in sides] + (["<th>change</th>"] if "baseline" in sides else []) + ["</tr>"]
    for region, entry in size.items():
        for key, label in SIZE_ROWS:
            cells = "".join(f"<td>{_num(entry[s][key])}</td>" for s in sides)
            if "change" in entry:
                cells += f"<td>{_num(entry['change'][key])}</td>"
            src = f" <span class=small>(boxes of {e(entry['source'])})</span>" if key == "per_image" else ""
            out.append(f"<tr><td>{e(region)}{src}</td><td>{label}</td>{cells}</tr>")
    out.append("</table>")
    return out


def _detection_weighted_table(summary: dict[str, Any], sides: list[str]) -> list[str]:
    """Region rewards averaged per image and per detection (FairHuman's mean over every face / hand)."""
    e = html.escape
    rows = [(n, r) for n, r in summary["rewards"].items() if "detection_weighted" in r[sides[0]]]
    if not rows:
        return []
    out = ["<h2>Region rewards: per image and per detection</h2><table><tr><th>reward</th>"]
    out += [f"<th>{s} per image</th><th>{s} per detection</th>" for s in sides] + ["</tr>"]
    for name, r in rows:
        cells = ""
        for s in sides:
            dw = r[s]["detection_weighted"]
            why = f" <span class=small>({e(dw['reason'])})</span>" if dw["reason"] else f" ({dw['n_detections']})"
            cells += f"<td>{_num(r[s]['mean'])}</td><td>{_num(dw['mean'])}{why}</td>"
        out.append(f"<tr><td>{e(name)}</td>{cells}</tr>")
    out.append("</table>")
    return out


def _style_table(summary: dict[str, Any], sides: list[str]) -> list[str]:
    """Every reward's mean (and win rate) per style of a styled prompt set."""
    e = html.escape
    styles = summary.get("styles")
    if not styles:
        return []
    out = ["<h2>Per style</h2><table><tr><th>style</th><th>images</th><th>reward</th>"]
    out += [f"<th>{s} mean [95% CI]</th>" for s in sides]
    out += ["<th>win rate [95% CI]</th>"] if "baseline" in sides else []
    out.append("</tr>")
    for style, st in styles.items():
        for name, r in st["rewards"].items():
            cells = "".join(f"<td>{_ci(r[s])}</td>" for s in sides)
            cells += f"<td>{_ci(r['win_rate'])}</td>" if "win_rate" in r else ""
            out.append(f"<tr><td>{e(style)}</td><td>{st['n_images']}</td><td>{e(name)}</td>{cells}</tr>")
    out.append("</table>")
    return out


def render_html(
    summary: dict[str, Any], grids: list[str], dists: dict[str, str], win_plot: str | None, max_samples: int
) -> str:
    """The index page: models, settings, per-reward table, region rates, plots and grids."""
    e = html.escape
    sides = list(summary["models"])
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>rlfh evaluation</title>",
        f"<style>{CSS}</style></head><body><h1>rlfh evaluation</h1>",
        "<table><tr><th>side</th><th>model</th></tr>",
    ]
    out += [f"<tr><td>{s}</td><td>{e(m['label'])}</td></tr>" for s, m in summary["models"].items()]
    st = summary["settings"]
    out.append(
        f"</table><p>{summary['num_images_per_model']} images per model: prompt set "
        f"<b>{e(str(summary['prompt_set']))}</b>, {summary['num_prompts']} prompts x seeds "
        f"{e(str(summary['seeds']))}; {st['height']}x{st['width']} px, {st['num_inference_steps']} steps, "
        f"guidance {st['guidance_scale']}.</p><p class=small>95% CI: {e(summary['ci_method'])}. "
        f"Win rule: {e(summary['win_rule'])}.</p><h2>Rewards</h2><table><tr><th>reward</th><th>region</th>"
    )
    out += [f"<th>{s} mean [95% CI]</th><th>{s} not computable</th>" for s in sides]
    if "baseline" in sides:
        out.append("<th>win rate [95% CI]</th><th>compared / excluded</th>")
    out.append("</tr>")
    for name, r in summary["rewards"].items():
        row = f"<tr><td>{e(name)}</td><td>{e(str(r['region']))}</td>"
        row += "".join(f"<td>{_ci(r[s])}</td><td>{_missing(r[s])}</td>" for s in sides)
        if "win_rate" in r:
            w = r["win_rate"]
            row += f"<td>{_ci(w)}</td><td>{w['n_compared']} / {w['excluded']}</td>"
        out.append(row + "</tr>")
    out.append("</table><h2>Detections</h2>")
    detected = [(s, region, rr) for s in sides for region, rr in summary["regions"][s].items()]
    if detected:
        out.append("<table><tr><th>side</th><th>region</th><th>images checked</th><th>none found</th></tr>")
        out += [
            f"<tr><td>{s}</td><td>{e(region)}</td><td>{rr['checked']}</td>"
            f"<td>{rr['no_detection']} ({rr['no_detection_rate']:.0%})</td></tr>"
            for s, region, rr in detected
        ]
        out.append("</table>")
    else:
        out.append("<p>No detector ran: no reward of this evaluation reports face, hand or other regions.</p>")
    out += _detection_weighted_table(summary, sides) + _region_size_table(summary, sides)
    out += _style_table(summary, sides) + _collapse_table(summary, sides)
    # Plots in the Rewards table's order, each kind under its own heading.
    out.append("<h2>Distributions</h2><div class=plots>")
    out += [f"<img src='{dists[n]}' alt='{e(n)} distribution'>" for n in summary["rewards"] if n in dists]
    out.append("</div>")
    if win_plot:
        out.append(f"<h2>Win rates</h2><div class=plots><img src='{win_plot}' alt='win rates'></div>")
    shown = min(max_samples, len(summary["samples"]))
    out.append(
        f"<h2>Samples</h2><p class=small>{shown} of {len(summary['samples'])} samples; boxes: "
        "<span style='color:#28c83c'>face</span>, <span style='color:#ff8c00'>hand</span>, "
        "<span style='color:#3c78ff'>other</span>. Full-size images are in images/.</p><div class=grids>"
    )
    out += [f"<a href='{g}'><img src='{g}' alt='sample grid {i}'></a><br>" for i, g in enumerate(grids)]
    out.append("</div></body></html>")
    return "\n".join(out)


def write_eval_report(out_dir: str | Path, max_samples: int = 96) -> Path:
    """Write grids, plots and ``index.html`` for the evaluation in ``out_dir``; returns index.html.

    Raises:
        FileNotFoundError: ``out_dir/eval.json`` is missing.
    """
    out = Path(out_dir)
    if not (out / "eval.json").is_file():
        raise FileNotFoundError(f"{out}/eval.json not found: run `rlfh eval ... --out {out}` first")
    summary = json.loads((out / "eval.json").read_text())
    grids = write_grids(out, summary, max_samples)
    dists = write_distribution_plots(out, summary)
    win = write_win_rate_plot(out, summary)
    index = out / "index.html"
    index.write_text(render_html(summary, grids, dists, win, max_samples))
    return index
