"""The labeling page's HTML, rendered on the server (every value escaped); the keys are in
rlfh/assets/labeling/label.js, and every control also works as a plain form without it."""

from __future__ import annotations

from html import escape

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1rem 2rem; background: #fafafa; color: #222; }
header { display: flex; gap: 2rem; align-items: baseline; flex-wrap: wrap; }
#prompt { font-size: 1.25rem; }
.grid { display: flex; flex-wrap: wrap; gap: 1rem; margin: 1rem 0; }
figure.item { margin: 0; padding: .5rem; background: #fff; border: 3px solid #ddd; border-radius: 6px; }
figure.item.best { border-color: #2a9d2a; } figure.item.worst { border-color: #d62728; }
.frame { position: relative; width: 320px; }
.frame img { display: block; width: 100%; image-rendering: pixelated; }
.box { position: absolute; box-sizing: border-box; border: 2px solid #28c83c; pointer-events: none; }
.box.hand { border-color: #ff8c00; }
body:not(.show-boxes) .box, body:not(.show-rewards) .rewards { display: none; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 .3rem; background: #eee; }
.actions { display: flex; gap: 1rem; align-items: center; }
.help { color: #666; font-size: .9rem; }
"""


def _head(title: str) -> str:
    head = f"<meta charset=utf-8><title>{escape(title)}</title><style>{STYLE}</style>"
    return f"<!doctype html><html lang=en><head>{head}</head>"


def _hidden(**fields) -> str:
    return "".join(f'<input type=hidden name="{escape(k)}" value="{escape(str(v))}">' for k, v in fields.items())


def _boxes(item) -> str:
    if not item.height or not item.width:
        return ""
    out = []
    for b in item.boxes:
        x1, y1, x2, y2 = b["box"]
        style = (
            f"left:{100 * x1 / item.width:.2f}%;top:{100 * y1 / item.height:.2f}%;"
            f"width:{100 * (x2 - x1) / item.width:.2f}%;height:{100 * (y2 - y1) / item.height:.2f}%"
        )
        title = f"{b['region']} {b['confidence']:.2f}" if b.get("confidence") is not None else b["region"]
        out.append(f'<div class="box {escape(b["region"])}" style="{style}" title="{escape(title)}"></div>')
    return "".join(out)


def _rewards(item) -> str:
    rows = "".join(
        f"<tr><td>{escape(n)}</td><td>{'n/a' if v is None else f'{v:.4g}'}</td></tr>" for n, v in item.rewards.items()
    )
    return f"<table class=rewards>{rows}</table>" if rows else ""


def _choice_controls(state, item, n: int, k: int) -> str:
    rid = escape(item.rollout_id)
    if state.mode == "best-worst":
        worst = "" if n == 2 else f'<label><input type=radio name=loser value="{rid}"> worst</label>'
        return f'<label><input type=radio name=winner value="{rid}"> best</label> {worst}'
    side = ("left", "right")[k] if n == 2 else f"#{k + 1}"
    return f'<button type=submit name=winner value="{rid}" data-key="{k + 1}">{side} is better</button>'


def _figure(state, item, n: int, k: int) -> str:
    src = escape(state.url(f"/image/{item.rollout_id}"))
    return (
        f'<figure class=item data-id="{escape(item.rollout_id)}" data-index="{k + 1}">'
        f'<div class=frame><img src="{src}" alt="image {k + 1}">{_boxes(item)}</div>'
        f"<figcaption><kbd>{k + 1}</kbd> {_choice_controls(state, item, n, k)}{_rewards(item)}</figcaption></figure>"
    )


def _help(mode: str, n: int) -> str:
    if mode == "best-worst" and n > 2:
        pick = "<kbd>1</kbd>..<kbd>9</kbd>: the best, then the worst (saved at the second key); <kbd>Esc</kbd>: clear"
    elif mode == "best-worst":
        pick = "<kbd>1</kbd> / <kbd>2</kbd>: the better image (saved at once)"
    else:
        pick = "<kbd>1</kbd> or <kbd>&larr;</kbd>: left better; <kbd>2</kbd> or <kbd>&rarr;</kbd>: right better"
    return (
        f"<p class=help>{pick}; <kbd>0</kbd>: tie; <kbd>S</kbd>: skip; <kbd>U</kbd>: undo the last label; "
        "<kbd>B</kbd>: boxes; <kbd>R</kbd>: rewards (hidden by default so they do not sway you)</p>"
    )


def _progress(state, labeler: str, prog: dict) -> str:
    done, total = len(prog["labeled"]), len(state.tasks)
    others = ", ".join(escape(x) for x in prog["labelers"]) or "nobody yet"
    return (
        f'<span id=progress>{done} / {total} labeled by {escape(labeler)}</span> <progress value="{done}" '
        f'max="{total}"></progress> <span class=help>{prog["all_labels"]} labels in all ({others}); '
        f"{len(prog['skipped'])} skipped</span>"
    )


def _undo_form(state, labeler: str) -> str:
    return (
        f'<form id=undo-form method=post action="{escape(state.url("/undo"))}">{_hidden(labeler=labeler)}'
        "<button type=submit id=undo>Undo <kbd>U</kbd></button></form>"
    )


def render_task(state, labeler: str, task, prog: dict) -> str:
    n = len(task.items)
    figures = "".join(_figure(state, it, n, k) for k, it in enumerate(task.items))
    save = "<button type=submit id=save>Save <kbd>Enter</kbd></button>" if state.mode == "best-worst" else ""
    return (
        f"{_head('rlfh label')}<body data-mode=\"{escape(state.mode)}\" data-n=\"{n}\">"
        f"<header><span id=prompt>{escape(task.prompt)}</span>{_progress(state, labeler, prog)}</header>"
        f'<form id=choice method=post action="{escape(state.url("/label"))}">'
        f"{_hidden(labeler=labeler, task=task.key)}<div class=grid>{figures}</div>"
        f'<div class=actions>{save}<button type=submit name=tie value=1 id=tie data-key="0">Tie <kbd>0</kbd></button>'
        "</div></form><div class=actions>"
        f'<form id=skip-form method=post action="{escape(state.url("/skip"))}">'
        f"{_hidden(labeler=labeler, task=task.key)}<button type=submit id=skip>Skip <kbd>S</kbd></button></form>"
        f"{_undo_form(state, labeler)}"
        "<label><input type=checkbox id=show-boxes> boxes</label>"
        "<label><input type=checkbox id=show-rewards> rewards</label></div>"
        f'{_help(state.mode, n)}<script src="{escape(state.url("/static/label.js"))}"></script></body></html>'
    )


def render_done(state, labeler: str, prog: dict) -> str:
    return (
        f"{_head('rlfh label: done')}<body data-mode=\"{escape(state.mode)}\" data-n=0>"
        f"<header><span id=prompt>All tasks labeled.</span>{_progress(state, labeler, prog)}</header>"
        f"<p>Labels are in {escape(str(state.table.path))}.</p>{_undo_form(state, labeler)}"
        f'<script src="{escape(state.url("/static/label.js"))}"></script></body></html>'
    )
