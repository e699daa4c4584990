"""Image domain through the real daemon with builtin:tiny-sd."""
from __future__ import annotations

import json
import os
import struct

import pytest

from resiso_cli.client import Rejected

from .conftest import BIN

IMAGE_CONFIG = """
[daemon]
heartbeat_ms = 200
[domains.image]
kind = "image"
default_width = 64
default_height = 64
max_side = 512
"""


@pytest.fixture(scope="module")
def image_daemon(make_module_daemon):
    return make_module_daemon(IMAGE_CONFIG)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_progress_every_step_and_png_of_requested_size(image_daemon):
    with image_daemon.client() as c:
        stream = c.submit("image", {"prompt": "a red bicycle", "width": 96, "height": 64,
                                    "steps": 6, "seed": 1})
        assert stream.accepted["status"] == "queued"
        assert "estimated_time_ms" in stream.accepted
        evs = list(stream)
        final = stream.final
        data = c.get(stream.task_id, data=True)["data"]
    prog = [e for e in evs if e["event"] == "progress"]
    assert [e["step"] for e in prog] == [1, 2, 3, 4, 5, 6]
    assert all(e["total"] == 6 for e in prog)
    assert prog[-1]["progress"] == 1.0 and prog[-1]["estimated_time_remaining_ms"] == 0
    assert all("estimated_time_remaining_ms" in e for e in prog)
    assert final["event"] == "result"
    assert (final["width"], final["height"], final["seed"]) == (96, 64, 1)
    assert png_size(data) == (96, 64)
    assert final["size_bytes"] == len(data)
    assert os.path.isfile(final["image_path"])


def test_same_seed_same_bytes(image_daemon):
    with image_daemon.client() as c:
        p = {"prompt": "a lighthouse", "steps": 3, "seed": 1234}
        a = c.submit("image", p).wait()
        b = c.submit("image", p).wait()
        other = c.submit("image", {**p, "seed": 99}).wait()
        da, db = (c.get(x["task_id"], data=True)["data"] for x in (a, b))
        do = c.get(other["task_id"], data=True)["data"]
    assert da == db and da != do


def test_cancel_mid_run_leaves_no_image(image_daemon):
    with image_daemon.client() as c:
        stream = c.submit("image", {"prompt": "slow", "steps": 150, "width": 256,
                                    "height": 256})
        for ev in stream:
            if ev["event"] == "progress" and ev["step"] == 2:
                c.cancel(stream.task_id)
        assert stream.final["event"] == "cancelled"
        rec = c.get(stream.task_id)
        assert rec["status"] == "cancelled" and rec.get("step", 0) < 150
        state_dir = image_daemon.state_dir
        assert not os.path.exists(os.path.join(state_dir, "results",
                                               f"{stream.task_id}.png"))
        assert c.submit("image", {"prompt": "next", "steps": 2}).wait()["status"] == "completed"


def test_three_jobs_positions_and_order(image_daemon):
    with image_daemon.client() as c:
        streams = [c.submit("image", {"prompt": f"job {i}", "steps": 8, "width": 128,
                                      "height": 128}) for i in range(3)]
        assert [s.accepted["position"] for s in streams] == [0, 1, 2]
        third = list(streams[2])
        finals = [s.wait() for s in streams[:2]] + [streams[2].final]
    positions = [e["position"] for e in third if e["event"] == "queued"]
    # the third job's position counts down while the first two run, then it starts
    assert positions and positions == sorted(positions, reverse=True) and positions[0] < 2
    names = [e["event"] for e in third]
    assert names.index("started") > max(i for i, n in enumerate(names) if n == "queued")
    assert all(f["status"] == "completed" for f in finals)
    assert finals[0]["finished_at"] <= finals[1]["finished_at"] <= finals[2]["finished_at"]
    assert streams[2].accepted["estimated_time_ms"] > 0  # learned from earlier jobs


@pytest.mark.parametrize("params,needle", [
    ({"prompt": ""}, "empty"),
    ({"prompt": "x", "width": 100}, "multiple of 8"),
    ({"prompt": "x", "height": 1024}, "height"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 151}, "steps"),
    ({"prompt": "x", "seed": -1}, "seed"),
])
def test_bad_input_rejected(image_daemon, params, needle):
    with image_daemon.client() as c:
        with pytest.raises(Rejected) as exc:
            c.submit("image", params)
    assert exc.value.code == "bad_request" and needle in exc.value.message


def test_no_wait_then_wait_then_get(image_daemon, tmp_path):
    r = image_daemon.cli("image", "a boat", "--steps", "3", "--no-wait")
    assert r.returncode == 0
    task_id = r.stdout.decode().strip()
    assert task_id.startswith("img_")
    r = image_daemon.cli("wait", task_id)
    assert r.returncode == 0
    out = tmp_path / "x.png"
    r = image_daemon.cli("get", task_id, "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["out"] == str(out)
    assert png_size(out.read_bytes()) == (64, 64)


def test_watch_in_a_terminal_shows_a_progress_bar(image_daemon, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    out = tmp_path / "w.png"
    child = pexpect.spawn(os.path.join(BIN, "resiso"),
                          ["image", "a tree", "--steps", "12", "--width", "128",
                           "--height", "128", "--out", str(out)],
                          env={**image_daemon.env, "COLUMNS": "100", "TERM": "xterm"},
                          timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    text = child.before.decode(errors="replace")
    assert child.exitstatus == 0, text
    assert "12/12" in text and "━" in text
    assert str(out) in text
    assert png_size(out.read_bytes()) == (128, 128)


def test_ctrl_c_while_watching_detaches_and_the_job_runs_on(image_daemon):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(os.path.join(BIN, "resiso"),
                          ["image", "a long one", "--steps", "60", "--width", "256",
                           "--height", "256"],
                          env={**image_daemon.env, "COLUMNS": "100", "TERM": "xterm"},
                          timeout=60)
    child.expect("/60")  # the bar shows steps
    child.sendintr()
    child.expect("detached from (img_[0-9a-f]+)")
    task_id = child.match.group(1).decode()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    with image_daemon.client() as c:
        assert c.get(task_id)["status"] in ("running", "completed")
        assert c.watch(task_id).wait()["status"] == "completed"
