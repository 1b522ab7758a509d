"""The labeling page over HTTP (Starlette's test client): labels, undo, skip, resume, and every refusal."""

import pytest

from rlfh.labeling.app import MAX_BODY, Labeling, make_app
from rlfh.labeling.table import LabelsTable
from tests.labeling.logs import write_label_log

BASE = "http://127.0.0.1:8765"
FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    return write_label_log(tmp_path_factory.mktemp("label-log"), n_groups=3, per_group=3)


def client(log_dir, mode="best-worst", host="127.0.0.1", token=None, base=BASE):
    from starlette.testclient import TestClient

    state = Labeling(log_dir, mode, "ann", host, token)
    return TestClient(make_app(state), base_url=base, follow_redirects=False), state


@pytest.fixture()
def fresh_log(tmp_path):
    return write_label_log(tmp_path / "log", n_groups=3, per_group=3)


def test_best_worst_session_with_skip_undo_and_resume(fresh_log):
    c, state = client(fresh_log)
    page = c.get("/")
    assert page.status_code == 200 and "prompt 0" in page.text and "0 / 3 labeled by ann" in page.text
    assert "Content-Security-Policy" in page.headers and "g0-0" in page.text
    r = c.post("/label", data={"labeler": "ann", "task": state.tasks[0].key, "winner": "g0-2", "loser": "g0-0"})
    assert r.status_code == 303
    assert "prompt 1" in c.get(r.headers["location"]).text
    assert c.post("/skip", data={"labeler": "ann", "task": state.tasks[1].key}).status_code == 303
    page = c.get("/?labeler=ann").text
    assert "prompt 2" in page and "1 skipped" in page
    r = c.post("/label", data={"labeler": "ann", "task": state.tasks[2].key, "winner": "g2-0", "loser": "g2-1"})
    assert "prompt 1" in c.get("/?labeler=ann").text  # the skipped task comes back last
    # undo takes the last label back and shows its task
    r = c.post("/undo", data={"labeler": "ann"})
    assert r.status_code == 303 and "task=" in r.headers["location"]
    assert "prompt 2" in c.get(r.headers["location"]).text
    # resume: a new server on the same log shows the same next task and keeps the labels
    c2, _ = client(fresh_log)
    assert "prompt 2" in c2.get("/?labeler=ann").text and "1 / 3 labeled by ann" in c2.get("/?labeler=ann").text
    labels = LabelsTable(fresh_log).labels()
    assert [(lab.winner, lab.loser, lab.labeler) for lab in labels] == [("g0-2", "g0-0", "ann")]
    # another labeler starts from the first task
    assert "prompt 0" in c2.get("/?labeler=bob").text


def test_pairwise_tie_and_two_image_inference(fresh_log):
    c, state = client(fresh_log, mode="pairwise")
    assert len(state.tasks) == 9  # 3 pairs in each group of 3
    t0, t1 = state.tasks[0], state.tasks[1]
    a, b = (it.rollout_id for it in t0.items)
    assert c.post("/label", data={"labeler": "ann", "task": t0.key, "winner": b}).status_code == 303
    assert c.post("/label", data={"labeler": "ann", "task": t1.key, "tie": "1"}).status_code == 303
    labels = LabelsTable(fresh_log).labels()
    assert (labels[0].winner, labels[0].loser) == (b, a) and labels[1].tie


def test_images_are_served_by_rollout_id_only(log_dir):
    c, _ = client(log_dir)
    r = c.get("/image/g1-2")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    for path in ("/image/manifest.json", "/image/..%2Fmanifest.json", "/image/shard-000000.parquet", "/../etc/passwd"):
        assert c.get(path).status_code == 404, path
    assert c.get("/image/%2e%2e/labels.jsonl").status_code == 404


def test_malformed_requests_get_4xx(log_dir):
    c, state = client(log_dir)
    key = state.tasks[0].key
    cases = [
        ({"labeler": "ann", "task": "nope", "winner": "g0-0"}, 400),
        ({"labeler": "ann", "task": key, "winner": "g1-0", "loser": "g0-0"}, 400),  # not the task's image
        ({"labeler": "ann", "task": key, "winner": "g0-0"}, 400),  # three images: the worst is needed
        ({"labeler": "ann", "task": key, "winner": "g0-0", "loser": "g0-0"}, 400),
        ({"labeler": "../x", "task": key, "winner": "g0-0", "loser": "g0-1"}, 400),
    ]
    for data, status in cases:
        assert c.post("/label", data=data).status_code == status, data
    assert c.post("/label", content=b'{"task": 1}', headers={"content-type": "application/json"}).status_code == 415
    assert c.post("/label", content=b"a=1&a=2", headers=FORM).status_code == 400
    assert c.post("/label", content=b"\xff\xfe=\xff", headers=FORM).status_code == 400
    assert c.post("/label", content=b"x" * (MAX_BODY + 1), headers=FORM).status_code == 413
    assert c.post("/undo", data={"labeler": "nobody"}).status_code == 409
    assert c.get("/label").status_code == 405 and c.get("/nothing").status_code == 404
    assert c.get("/?task=unknown").status_code == 404
    assert not LabelsTable(log_dir).labels()


def test_double_submission_is_a_conflict(fresh_log):
    c, state = client(fresh_log)
    data = {"labeler": "ann", "task": state.tasks[0].key, "winner": "g0-0", "loser": "g0-1"}
    assert c.post("/label", data=data).status_code == 303
    assert c.post("/label", data=data).status_code == 409
    assert len(LabelsTable(fresh_log).labels()) == 1


def test_host_origin_and_token_rules(log_dir):
    c, _ = client(log_dir, base="http://evil.example:8765")  # DNS rebinding: a foreign Host on loopback
    assert c.get("/").status_code == 400
    c, state = client(log_dir)
    r = c.post("/undo", data={"labeler": "ann"}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    # beyond loopback a token is made and required, on every route
    c, state = client(log_dir, host="0.0.0.0", base="http://10.1.2.3:8765")
    assert state.token and len(state.token) >= 20
    assert c.get("/").status_code == 403 and c.get("/image/g0-0").status_code == 403
    assert c.get("/?token=wrong").status_code == 403
    page = c.get(f"/?token={state.token}")
    assert page.status_code == 200 and f"token={state.token}" in page.text  # links and forms carry it
    assert c.get(f"/image/g0-0?token={state.token}").status_code == 200
    c, state = client(log_dir, token="s3cret")  # a token given on loopback is required too
    assert c.get("/").status_code == 403 and c.get("/?token=s3cret").status_code == 200
