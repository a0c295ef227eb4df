"""`embedpipe run`: a line per task, each task's log in a file, a one-line failure."""

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_embeddings

from embedpipe.pipelines.progress import Progress, Task, failure_cause

ANSI = "\x1b"


def run_cli(config: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "embedpipe", "run", "mine", "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def mine_config(root: Path, images: str, metadata: str, embeddings: str) -> Path:
    """The mine pipeline on given inputs (no preprocess run, no model): the fastest
    pipeline with a ParallelFor. The cluster retries are not used locally: a failure is final
    at once."""
    config = root / "config.toml"
    config.write_text(
        f'[global]\npipeline_root = "{root / "runs"}"\n'
        f'[paths]\nimages = "{images}"\nmetadata = "{metadata}"\nembeddings = "{embeddings}"\n'
        "[cluster]\nretries = 2\n"
    )
    return config


@pytest.fixture(scope="module")
def mine_inputs(demo_images, tmp_path_factory):
    meta, emb = random_embeddings(demo_images, tmp_path_factory.mktemp("inputs"), dim=16)
    return demo_images, meta, emb


@pytest.fixture(scope="module")
def quiet_run(mine_inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    return run_cli(mine_config(root, *mine_inputs))


@pytest.mark.slow
def test_a_run_shows_a_line_per_task_and_logs_each_task_to_a_file(quiet_run):
    assert quiet_run.returncode == 0, quiet_run.stderr
    out = quiet_run.stdout
    lines = out.splitlines()
    assert ANSI not in out + quiet_run.stderr
    assert "\r" not in out
    assert "executor_input" not in out and '"inputs"' not in out
    assert quiet_run.stderr == ""
    assert "partition running" in lines
    assert any(re.fullmatch(r"partition done \d+\.\d s", line) for line in lines)
    done = [line for line in lines if re.match(r"mine \[\w+\] done ", line)]
    assert len(done) == 4 and all("queries=" in line for line in done)
    assert any(re.fullmatch(r"combine done \d+\.\d s rows=\d+ categories=4", ln) for ln in lines)
    assert len(lines) < 40
    log_dir = Path(lines[-1].removeprefix("task logs: "))
    assert log_dir.name == "logs" and log_dir.parent.name.startswith("embedpipe-mine-")
    logs = {path.name: path.read_text() for path in log_dir.iterdir()}
    assert {"partition.log", "combine.log", "to-hf.log", "pipeline.log"} <= set(logs)
    categories = [name for name in logs if name.startswith("mine-")]
    assert len(categories) == 4
    box = logs["mine-box.log"]
    assert "Got executor_input" in box and "mine box:" in box
    assert ANSI not in box
    assert not any(key.startswith("logs/") for key in out.split())


@pytest.mark.slow
def test_a_failed_run_ends_with_the_task_its_cause_and_its_log(mine_inputs, tmp_path):
    images, meta, emb = mine_inputs
    damaged = tmp_path / "embeddings"
    shutil.copytree(emb, damaged)
    (damaged / ".embedpipe" / "manifest.json").unlink()
    done = run_cli(mine_config(tmp_path, images, meta, str(damaged)))
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert ANSI not in done.stdout + done.stderr
    assert "partition running" in done.stdout.splitlines()
    assert re.search(r"^partition failed \d+\.\d s$", done.stdout, re.MULTILINE)
    assert re.search(r"^combine skipped$", done.stdout, re.MULTILINE)
    error = done.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"embedpipe run: error: task partition failed: (.+); log: (\S+)", error)
    assert match, error
    assert match[1].startswith("DatasetError: ") and "manifest.json" in match[1]
    log = Path(match[2])
    assert log.name == "partition.log" and "Traceback" in log.read_text()


def test_failure_cause_is_the_last_exception_line():
    log = [
        "[KFP Executor 2026-01-01 INFO]: starting\n",
        "Traceback (most recent call last):\n",
        '  File "x.py", line 1, in <module>\n',
        "KeyError: 'a'\n",
        "\n",
        "During handling of the above exception, another exception occurred:\n",
        "Traceback (most recent call last):\n",
        '  File "x.py", line 3, in <module>\n',
        "    raise LayoutError(msg)\n",
        "embedpipe.data.sources.LayoutError: /data: no images found\n",
        "  with a second line\n",
    ]
    assert failure_cause(log) == "LayoutError: /data: no images found"
    own = ["[KFP Executor 2026-01-01 ERROR]: embed: no GPU and device = cuda\n", "bye\n"]
    assert failure_cause(own) == "embed: no GPU and device = cuda"
    assert failure_cause([]) == "no output (see the log)"


def tasks_in_states():
    done = Task("ingest", "ingest", "done", 0.0, 3.21, {"images": 397.0, "seconds": 3.1})
    running = Task("mine", "mine [box]", "running", 1.0)
    return [done, running, Task("combine", "combine")]


def test_plain_output_is_a_line_per_state_change():
    stream = io.StringIO()
    progress = Progress(stream)
    tasks = tasks_in_states()
    progress.start("p", "/runs/p-1", tasks)
    progress.changed(tasks[0])
    progress.changed(tasks[1])
    progress.finish()
    assert stream.getvalue().splitlines() == [
        "pipeline p: run folder /runs/p-1",
        "ingest done 3.2 s images=397",
        "mine [box] running",
        "combine skipped",
    ]


def test_a_terminal_gets_the_lines_redrawn_in_place():
    stream = io.StringIO()
    progress = Progress(stream, live=True, tick=60)
    tasks = tasks_in_states()
    progress.start("p", "/runs/p-1", tasks)
    progress.changed(tasks[1])
    progress.finish()
    text = stream.getvalue()
    assert text.count("\x1b[3F") == 2  # each redraw goes back over the three lines
    last = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line) for line in text.splitlines()[-3:]]
    assert last[0].split() == ["ingest", "done", "3.2", "s", "images=397"]
    assert last[2].split() == ["combine", "skipped"]


@pytest.mark.slow
def test_a_missing_images_shard_fails_the_first_step_not_the_last(mine_inputs, tmp_path):
    images, meta, emb = mine_inputs
    damaged = tmp_path / "images"
    shutil.copytree(images, damaged)
    next(damaged.glob("part-*.parquet")).unlink()
    done = run_cli(mine_config(tmp_path, str(damaged), meta, emb))
    assert done.returncode == 1
    assert re.search(r"^partition failed", done.stdout, re.MULTILINE)
    assert not re.search(r"^mine \[.*\] running", done.stdout, re.MULTILINE)
    error = done.stderr.strip().splitlines()[-1]
    assert "task partition failed: DatasetError: " in error and "part-" in error
