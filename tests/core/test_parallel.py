import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from embedpipe.core import parallel

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")


def slow_png() -> bytes:
    """Small on disk, about 30 ms to decode: keeps workers busy without heavy I/O."""
    ramp = np.linspace(0, 255, 1000).astype(np.uint8)
    pixels = np.stack([np.tile(ramp, (1000, 1)), np.tile(ramp[:, None], (1, 1000))], -1)
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate([pixels, pixels[..., :1]], -1)).save(buffer, "PNG")
    return buffer.getvalue()


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, start time) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(name)] = (int(fields[1]), fields[0], fields[19])
    return table


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of every process below ``root``."""
    table = process_table()
    found: dict[int, str] = {}
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier} - set(found)
        found.update({pid: table[pid][2] for pid in frontier})
    return found


def survivors(processes: dict[int, str]) -> list[int]:
    table = process_table()
    return [
        pid
        for pid, started in processes.items()
        if pid in table and table[pid][2] == started and table[pid][1] != "Z"
    ]


def test_killing_ingest_leaves_no_worker_or_forkserver_behind(tmp_path):
    data = slow_png()
    (tmp_path / "src" / "cat").mkdir(parents=True)
    first = tmp_path / "first.png"
    first.write_bytes(data)
    for concept in range(4):
        folder = tmp_path / "src" / "cat" / f"concept{concept}"
        folder.mkdir()
        for index in range(150):
            os.link(first, folder / f"{index:03d}.png")  # 600 images, one file's worth of disk
    command = [sys.executable, "-m", "embedpipe", "ingest", str(tmp_path / "src")]
    command += ["--out", str(tmp_path / "out"), "--workers", "2"]
    owner = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        # forkserver, two workers (and the resource tracker)
        while len(children) < 3 and owner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            children = descendants(owner.pid)
        assert owner.poll() is None, "ingest ended before its workers were seen"
        assert len(children) >= 3
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 30
        while survivors(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert survivors(children) == []
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for pid in survivors(children):
            os.kill(pid, signal.SIGKILL)


def test_the_owner_watch_tells_a_live_process_from_a_gone_one():
    me = os.getpid()
    assert parallel._alive(me, parallel._start_time(me))
    assert not parallel._alive(me, "0")  # the same pid, started at another time: reused
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = parallel._start_time(child.pid)
    deadline = time.monotonic() + 30
    while parallel._alive(child.pid, started) and time.monotonic() < deadline:
        time.sleep(0.05)  # exited but not reaped yet: a zombie counts as gone
    assert not parallel._alive(child.pid, started)
    child.wait()
    assert not parallel._alive(child.pid, started)
