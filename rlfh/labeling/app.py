"""``rlfh label``: the labeling page, a Starlette app served by uvicorn (both come with Ray Serve).

    GET  /?labeler=NAME[&task=KEY]   the labeler's next task (or task KEY), server-rendered
    GET  /image/ROLLOUT_ID           the image of one record of the log given at start
    GET  /static/label.js            the page's keyboard shortcuts
    POST /label   labeler, task, winner[, loser] | tie=1      then 303 to the next task
    POST /skip    labeler, task
    POST /undo    labeler                                     takes back the labeler's last label or skip

Security: the server binds to 127.0.0.1 unless told otherwise, and then accepts only loopback Host
headers (a web page elsewhere cannot reach it by DNS rebinding). Bound beyond loopback it requires
``token=...`` in every URL (one is generated and printed when ``--token`` is not given), compared in
constant time. An image is looked up by rollout id in the index built from the verified log at start:
nothing from a request becomes a path. A POST whose ``Origin`` is not the page's own is refused (a
site open in the same browser cannot label), bodies over :data:`MAX_BODY` bytes get 413, anything
malformed a 4xx with the reason; every response forbids framing and external resources (CSP).
"""

from __future__ import annotations

import functools
import hmac
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from rlfh.labeling.table import LabelsTable, check_labeler
from rlfh.labeling.tasks import Task, load_tasks

MAX_BODY = 16 * 1024  # a form post is a few hundred bytes
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CSP = (
    "default-src 'none'; img-src 'self'; script-src 'self'; style-src 'unsafe-inline'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SCRIPT = Path(__file__).resolve().parents[1] / "assets" / "labeling" / "label.js"


class HTTPError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def host_name(header: str) -> str:
    """The host of a Host header value (``127.0.0.1:8765``, ``[::1]:8765``), lower case."""
    return (urlsplit(f"//{header}").hostname or "").lower()


class ImageIndex:
    """Rollout id -> (verified shard, row): the only way a request reaches a file."""

    def __init__(self, log_dir: str | Path):
        import pyarrow.parquet as pq

        from rollouts.log import RolloutLog

        self.where: dict[str, tuple[Path, int]] = {}
        for _, path in RolloutLog(log_dir).verified_shards():
            for row, rid in enumerate(pq.read_table(path, columns=["rollout_id"]).column(0).to_pylist()):
                self.where[rid] = (path, row)

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def _column(path: Path) -> list:
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=["image"]).column(0).to_pylist()

    def get(self, rid: str) -> bytes | None:
        if rid not in self.where:
            return None
        path, row = self.where[rid]
        return self._column(path)[row]


class Labeling:
    """The state behind the page: the tasks, the image index, the labels table and the access rules."""

    def __init__(self, log_dir, mode: str, labeler: str = "anonymous", host: str = "127.0.0.1", token=None):
        self.log_dir, self.mode, self.labeler = Path(log_dir), mode, check_labeler(labeler)
        self.tasks: list[Task] = load_tasks(log_dir, mode)
        self.by_key = {t.key: t for t in self.tasks}
        self.images = ImageIndex(log_dir)
        self.table = LabelsTable(log_dir)
        self.table.active()  # a damaged table stops the start, naming the line
        self.loopback = is_loopback(host)
        if not self.loopback and not token:
            token = secrets.token_urlsafe(18)
        self.token = token

    # ---- access ------------------------------------------------------------------------------

    def check_access(self, request: Request) -> None:
        if self.loopback and not is_loopback(host_name(request.headers.get("host", ""))):
            raise HTTPError(400, "this server answers only to a loopback Host (127.0.0.1 or localhost)")
        if self.token is not None:
            given = request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                raise HTTPError(403, "a valid access token is required: open the URL the server printed")
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin not in (None, "null") and urlsplit(origin).netloc != request.headers.get("host"):
                raise HTTPError(403, "cross-origin form posts are refused")

    def url(self, path: str, **params) -> str:
        params = {k: v for k, v in params.items() if v is not None}
        if self.token is not None:
            params["token"] = self.token
        return f"{path}?{urlencode(params)}" if params else path

    # ---- state -------------------------------------------------------------------------------

    def progress(self, labeler: str) -> dict[str, Any]:
        active = self.table.active()
        mine = [e for e in active if e["labeler"] == labeler and e["task"] in self.by_key]
        labeled = {e["task"] for e in mine if e["kind"] == "label"}
        skipped = {e["task"] for e in mine if e["kind"] == "skip"} - labeled
        return {
            "labeled": labeled,
            "skipped": skipped,
            "all_labels": sum(e["kind"] == "label" for e in active),
            "labelers": sorted({e["labeler"] for e in active if e["kind"] == "label"}),
        }

    def next_task(self, labeler: str) -> tuple[Task | None, dict]:
        prog = self.progress(labeler)
        fresh = [t for t in self.tasks if t.key not in prog["labeled"] and t.key not in prog["skipped"]]
        again = [t for t in self.tasks if t.key in prog["skipped"]]  # skipped ones come back last
        return (fresh or again or [None])[0], prog

    def record(self, labeler: str, form: dict[str, str]) -> None:
        """A label from a posted form, checked against the task; 4xx for anything that does not fit."""
        task = self.by_key.get(form.get("task", ""))
        if task is None:
            raise HTTPError(400, "unknown task")
        ids = [it.rollout_id for it in task.items]
        if task.key in self.progress(labeler)["labeled"]:
            raise HTTPError(409, "you labeled this task already; undo first to change the label")
        tie = form.get("tie") == "1"
        winner, loser = form.get("winner") or None, form.get("loser") or None
        if tie:
            winner = loser = None
        else:
            if winner not in ids:
                raise HTTPError(400, "winner must be one of the task's images")
            if loser is None and len(ids) == 2:
                loser = ids[1 - ids.index(winner)]
            if loser not in ids or loser == winner:
                raise HTTPError(400, "loser must be another of the task's images")
        self.table.append(
            {
                "kind": "label",
                "labeler": labeler,
                "mode": self.mode,
                "task": task.key,
                "records": ids,
                "winner": winner,
                "loser": loser,
                "tie": tie,
            }
        )


async def read_form(request: Request) -> dict[str, str]:
    """A url-encoded form body of at most :data:`MAX_BODY` bytes, one value per field."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise HTTPError(415, "send a form (application/x-www-form-urlencoded)")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise HTTPError(413, f"request body over {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPError(413, f"request body over {MAX_BODY} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "malformed form body") from None
    if any(len(v) != 1 for v in fields.values()):
        raise HTTPError(400, "each form field may be given once")
    return {k: v[0] for k, v in fields.items()}


def labeler_of(state: Labeling, value: str | None) -> str:
    try:
        return check_labeler(value or state.labeler)
    except ValueError as e:
        raise HTTPError(400, str(e)) from None


def guarded(handler):
    """``handler(state, request)`` as a route: access checked first, an HTTPError as its 4xx, the
    security headers on every response."""

    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        state: Labeling = request.app.state.labeling
        try:
            state.check_access(request)
            response = await handler(state, request)
        except HTTPError as e:
            response = PlainTextResponse(e.reason + "\n", status_code=e.status)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    return run


async def page(state: Labeling, request: Request) -> Response:
    from rlfh.labeling.page import render_done, render_task

    labeler = labeler_of(state, request.query_params.get("labeler"))
    key = request.query_params.get("task")
    task, prog = state.next_task(labeler)
    if key is not None:
        if key not in state.by_key:
            raise HTTPError(404, "no such task")
        task = state.by_key[key]
    if task is None:
        return HTMLResponse(render_done(state, labeler, prog))
    return HTMLResponse(render_task(state, labeler, task, prog))


async def image(state: Labeling, request: Request) -> Response:
    data = state.images.get(request.path_params["rid"])
    if data is None:
        raise HTTPError(404, "no image with that rollout id in this log")
    media = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    return Response(data, media_type=media)


async def script(state: Labeling, request: Request) -> Response:
    return Response(SCRIPT.read_bytes(), media_type="text/javascript")


def back(state: Labeling, labeler: str, task: str | None = None) -> Response:
    return RedirectResponse(state.url("/", labeler=labeler, task=task), status_code=303)


async def label(state: Labeling, request: Request) -> Response:
    form = await read_form(request)
    labeler = labeler_of(state, form.get("labeler"))
    state.record(labeler, form)
    return back(state, labeler)


async def skip(state: Labeling, request: Request) -> Response:
    form = await read_form(request)
    labeler = labeler_of(state, form.get("labeler"))
    if form.get("task") not in state.by_key:
        raise HTTPError(400, "unknown task")
    state.table.append({"kind": "skip", "labeler": labeler, "task": form["task"]})
    return back(state, labeler)


async def undo(state: Labeling, request: Request) -> Response:
    form = await read_form(request)
    labeler = labeler_of(state, form.get("labeler"))
    last = state.table.last_undoable(labeler)
    if last is None:
        raise HTTPError(409, "nothing to undo")
    state.table.append({"kind": "undo", "labeler": labeler, "target": last["id"]})
    return back(state, labeler, last["task"])


ROUTES = [
    Route("/", guarded(page), methods=["GET"]),
    Route("/image/{rid:str}", guarded(image), methods=["GET"]),
    Route("/static/label.js", guarded(script), methods=["GET"]),
    Route("/label", guarded(label), methods=["POST"]),
    Route("/skip", guarded(skip), methods=["POST"]),
    Route("/undo", guarded(undo), methods=["POST"]),
]


def make_app(state: Labeling) -> Starlette:
    """The Starlette app over ``state``: every route checks access first and turns errors into 4xx."""
    app = Starlette(routes=ROUTES)
    app.state.labeling = state
    return app


def serve(log_dir, mode: str, port: int, labeler: str, host: str = "127.0.0.1", token=None) -> None:
    """Build the state (failing on a bad log or table before binding), print the URL, serve until stopped."""
    import uvicorn

    state = Labeling(log_dir, mode, labeler, host, token)
    shown = f"[{host}]" if ":" in host else host
    print(f"[rlfh] labeling {len(state.tasks)} {mode} tasks of {log_dir}; labels go to {state.table.path}")
    print(f"[rlfh] open http://{shown}:{port}{state.url('/', labeler=labeler)}", flush=True)
    uvicorn.run(make_app(state), host=host, port=port, log_level="warning")
