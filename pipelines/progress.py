"""A quiet kfp.local run: one status line per task, each task's output in a log file.

kfp.local prints every task's executor input and streams its output to our stdout, and
offers no hook to change that. ``LocalRun`` wraps three of its module-level functions for
the length of one run: the one naming the run (to learn the run folder), the one running
a task (to learn which task each thread is running, and how it ended) and the one running
a task's subprocess (to send its output to that task's log file). ParallelFor iterations
run in threads, so output is routed by thread, not by file descriptor.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

LOG_DIR = "logs"  # under the run folder: <task>.log per task, pipeline.log for kfp.local
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# The numbers worth a glance per task; every value is in the task's Output[Metrics].
KEY_METRICS = {
    "ingest": ("images", "distinct_images", "rejected"),
    "catalog": ("concepts", "train_images", "test_images"),
    "split": ("train_concepts", "train_images", "val_images"),
    "taxonomy": ("species", "known_names", "labelled_images"),
    "dedup": ("images", "kept", "dropped"),
    "embed": ("embedded", "dim"),
    "mine": ("queries", "candidates", "recall"),
    "combine": ("rows", "categories"),
}
_COLOURS = {"running": "\x1b[36m", "done": "\x1b[32m", "cached": "\x1b[32m", "failed": "\x1b[31m"}
_TRACEBACK = "Traceback (most recent call last):"
_KFP_PREFIX = re.compile(r"^\[KFP Executor [^\]]*\]:\s*")
_MODULE_PATH = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*(?::|$))")


class PipelineFailed(RuntimeError):
    """A local run failed; the message names the task, its cause and its log file."""


@dataclass(eq=False)
class Task:
    name: str  # the pipeline's task name, e.g. "mine"
    label: str  # what the status line shows, e.g. "mine [box]"
    state: str = "pending"  # pending, running, cached, done, failed or skipped
    started: float | None = None
    ended: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    log_path: str | None = None
    attempts: int = 0  # subprocesses started: 0 is a cache hit, more than 1 are retries
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=400))
    log: TextIO | None = None

    def elapsed(self, now: float) -> str:
        if self.started is None:
            return ""
        return f"{(self.ended or now) - self.started:.1f} s"

    def metrics_text(self) -> str:
        keys = KEY_METRICS.get(self.name) or sorted(k for k in self.metrics if k != "seconds")
        shown = [k for k in keys if isinstance(self.metrics.get(k), int | float)][:3]
        return " ".join(f"{k}={_number(self.metrics[k])}" for k in shown)

    def notes(self) -> str:
        if self.state == "running":
            return f"(attempt {self.attempts})" if self.attempts > 1 else ""
        retried = f"after {self.attempts} attempts" if self.attempts > 1 else ""
        return " ".join(p for p in (self.metrics_text(), retried) if p)

    def line(self, now: float) -> str:
        """The one-line form, for output that is not a terminal."""
        parts = [self.label, self.state]
        if self.state != "running":
            parts.append(self.elapsed(now))
        return " ".join(p for p in (*parts, self.notes()) if p)

    def failure(self) -> str:
        return f"task {self.label} failed: {failure_cause(self.tail)}; log: {self.log_path}"


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def failure_cause(lines) -> str:
    """The one line that says why a task failed: the exception line of its last
    traceback, else its last line that mentions an error, else its last line."""
    lines = [ANSI.sub("", line).rstrip() for line in lines if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith(_TRACEBACK)]
    found = None
    if starts:
        found = next((ln for ln in lines[starts[-1] + 1 :] if not ln[0].isspace()), None)
    if found is None:
        errors = [ln for ln in lines if re.search(r"error|exception", ln, re.IGNORECASE)]
        found = (errors or lines or ["no output (see the log)"])[-1]
    return _MODULE_PATH.sub("", _KFP_PREFIX.sub("", found.strip()))[:300]


class Progress:
    """The status lines. On a terminal they are redrawn in place (elapsed time ticking);
    anywhere else each state change is printed once, as a line of plain text."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, tick: float = 0.5):
        self.stream = stream if stream is not None else sys.stdout
        self.live = _isatty(self.stream) if live is None else live
        self.tick = tick
        self.log_dir: str | None = None
        self._tasks: list[Task] = []
        self._drawn = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self, pipeline: str, run_dir: str, tasks: list[Task]) -> None:
        self._tasks = tasks
        self._write(f"pipeline {pipeline}: run folder {run_dir}\n")
        if self.live:
            self._draw()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def changed(self, task: Task) -> None:
        if self.live:
            self._draw()
        else:
            self._write(task.line(time.monotonic()) + "\n")

    def finish(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        for task in list(self._tasks):
            if task.state == "pending":
                task.state = "skipped"
                if not self.live:
                    self.changed(task)
        if self.live:
            self._draw()

    def _tick(self) -> None:
        while not self._stop.wait(self.tick):
            self._draw()

    def _draw(self) -> None:
        with self._lock:  # the ticker and the task threads draw
            tasks, now = list(self._tasks), time.monotonic()
            width = max((len(t.label) for t in tasks), default=0)
            columns = shutil.get_terminal_size().columns - 1
            out = [f"\x1b[{self._drawn}F"] if self._drawn else []
            for task in tasks:
                plain = f"  {task.label:<{width}}  {task.state:<8}{task.elapsed(now):>8}  "
                line = (plain + task.notes()).rstrip()[:columns]
                colour = None if os.environ.get("NO_COLOR") else _COLOURS.get(task.state)
                at = width + 4
                if colour and len(line) >= at + len(task.state):
                    line = f"{line[:at]}{colour}{task.state}\x1b[0m{line[at + len(task.state) :]}"
                out.append(f"\x1b[2K{line}\n")
            self.stream.write("".join(out))
            self.stream.flush()
            self._drawn = len(tasks)

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Router(io.TextIOBase):
    """sys.stdout/sys.stderr during a quiet run: text goes to the log of the task the
    writing thread runs, or to pipeline.log."""

    def __init__(self, run: LocalRun):
        self.run = run

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.run.route(text)
        return len(text)


class _Plain(io.TextIOBase):
    """A stream without ANSI colour codes."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.stream.write(ANSI.sub("", text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def planned_tasks(spec) -> list[str]:
    """The tasks that run a container, in kfp.local's order; importers and the DAGs of
    conditions and loops are left out (a loop's tasks show once per iteration)."""
    from kfp.local import graph_utils

    executors = spec.deployment_spec["executors"]

    def walk(dag):
        for name in reversed(graph_utils.topological_sort_tasks(dict(dag.tasks))):
            component = spec.components[dag.tasks[name].component_ref.name]
            if component.WhichOneof("implementation") == "dag":
                yield from walk(component.dag)
            elif "importer" not in executors[component.executor_label]:
                yield name

    return list(dict.fromkeys(walk(spec.root.dag)))


class LocalRun:
    """Context manager around one kfp.local pipeline run (SubprocessRunner). Each task's
    output goes to ``<run folder>/logs/<task>.log``; ``progress`` shows task states.
    ``verbose``: kfp.local's own output streams as well, and no status lines are drawn.
    Not re-entrant: kfp.local's functions are patched for the whole process."""

    def __init__(self, pipeline, progress: Progress, verbose: bool = False):
        self.spec = pipeline.pipeline_spec
        self.progress = progress
        self.verbose = verbose
        self.tasks = [Task(name, name) for name in planned_tasks(self.spec)]
        self.run_dir: str | None = None
        self.failed: list[Task] = []
        self._current = threading.local()
        self._lock = threading.Lock()
        self._early: list[str] = []  # text written before the run folder is known
        self._pipeline_log: TextIO | None = None
        self._stack = contextlib.ExitStack()

    @property
    def log_dir(self) -> str | None:
        return os.path.join(self.run_dir, LOG_DIR) if self.run_dir else None

    @property
    def pipeline_log(self) -> str | None:
        return os.path.join(self.log_dir, "pipeline.log") if self.log_dir else None

    def __enter__(self) -> LocalRun:
        from kfp.local import executor_input_utils, subprocess_task_handler
        from kfp.local.orchestrator import task_executor

        stack = self._stack
        stack.callback(self._close)  # last: after stdout and stderr are back
        self._patch(executor_input_utils, "get_local_pipeline_resource_name", self._named)
        self._patch(task_executor, "execute_single_task", self._execute)
        self._patch(subprocess_task_handler, "run_local_subprocess", self._subprocess)
        # kfp.local swaps builtins.print and the root logger's handlers per task, from
        # several threads at once; put back what was there before, whatever it leaves.
        stack.callback(setattr, builtins, "print", builtins.print)
        root = logging.getLogger()
        stack.callback(self._restore_logging, root, root.handlers[:], root.level)
        if not self.verbose:
            router = _Router(self)
            stack.enter_context(contextlib.redirect_stdout(router))
            stack.enter_context(contextlib.redirect_stderr(router))
            handler = logging.StreamHandler(router)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
            root.handlers[:] = [handler]
        elif not _isatty(sys.stdout):  # kfp.local colours its messages regardless
            stack.enter_context(contextlib.redirect_stdout(_Plain(sys.stdout)))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def failure(self, error: BaseException) -> PipelineFailed:
        """The error to raise when kfp.local reports the run failed."""
        if self.failed:
            return PipelineFailed(self.failed[0].failure())
        where = f"; log: {self.pipeline_log}" if self.pipeline_log else ""
        return PipelineFailed(ANSI.sub("", str(error)) + where)

    def route(self, text: str) -> None:
        text = ANSI.sub("", text)
        task = getattr(self._current, "task", None)
        if task is not None and task.log is not None:
            task.log.write(text)
        elif self._pipeline_log is not None:
            self._pipeline_log.write(text)
        else:
            self._early.append(text)

    def _patch(self, module, name: str, wrap) -> None:
        original = getattr(module, name)
        setattr(module, name, wrap(original))
        self._stack.callback(setattr, module, name, original)

    def _named(self, original):
        def get_local_pipeline_resource_name(pipeline_name: str) -> str:
            name = original(pipeline_name)
            from kfp.local import config

            root = config.LocalExecutionConfig.instance.pipeline_root
            self.run_dir = os.path.join(root, name)
            os.makedirs(self.log_dir, exist_ok=True)
            self._pipeline_log = open(self.pipeline_log, "a", buffering=1)  # noqa: SIM115
            self._pipeline_log.write("".join(self._early))
            self.progress.log_dir = self.log_dir
            if not self.verbose:
                self.progress.start(pipeline_name, self.run_dir, self.tasks)
            return name

        return get_local_pipeline_resource_name

    def _execute(self, original):
        signature = inspect.signature(original)

        def execute_single_task(*args, **kwargs):
            from kfp.local import status

            call = signature.bind(*args, **kwargs).arguments
            task = self._begin(**call)
            try:
                outputs, result = original(*args, **kwargs)
            except BaseException as error:
                task.tail.append(f"{type(error).__name__}: {error}")
                self._end(task, "failed")
                raise
            if result == status.Status.SUCCESS:
                self._end(task, "done" if task.attempts or task.log is None else "cached", outputs)
            else:
                self._end(task, "failed")
            return outputs, result

        return execute_single_task

    def _begin(
        self, task_name, task_spec, pipeline_resource_name, components, executors, io_store, **_
    ) -> Task:
        component = components[task_spec.component_ref.name]
        importer = executors[component.executor_label].WhichOneof("spec") == "importer"
        label, stem = task_name, task_name
        iteration = re.findall(r"-iteration-(\d+)(?=/|$)", pipeline_resource_name)
        if iteration:
            item = _loop_item(task_spec, io_store)
            label = f"{task_name} [{item}]" if item is not None else f"{task_name} #{iteration[-1]}"
            stem = f"{task_name}-{_safe(str(item)) if item is not None else iteration[-1]}"
        task = Task(task_name, label, state="running", started=time.monotonic())
        with self._lock:
            if not importer:  # importers only show when they fail
                self._place(task)
                task.log_path = self._log_path(stem)
                task.log = open(task.log_path, "a", buffering=1)  # noqa: SIM115
            else:
                task.log_path = self.pipeline_log
        self._current.task = task
        self._changed(task)
        return task

    def _place(self, task: Task) -> None:
        """Take the task's pending line, or add one after the lines of its name."""
        same = [i for i, t in enumerate(self.tasks) if t.name == task.name]
        pending = [i for i in same if self.tasks[i].state == "pending"]
        if pending:
            self.tasks[pending[0]] = task
        else:
            self.tasks.insert(same[-1] + 1 if same else len(self.tasks), task)

    def _log_path(self, stem: str) -> str:
        taken = {t.log_path for t in self.tasks}
        path, n = os.path.join(self.log_dir, f"{stem}.log"), 1
        while path in taken:
            n += 1
            path = os.path.join(self.log_dir, f"{stem}-{n}.log")
        return path

    def _end(self, task: Task, state: str, outputs: dict | None = None) -> None:
        from kfp import dsl

        for value in (outputs or {}).values():
            if isinstance(value, dsl.Metrics):
                task.metrics.update(value.metadata)
        task.state, task.ended = state, time.monotonic()
        self._current.task = None
        with self._lock:
            if task.log is not None:
                task.log.close()
                task.log = None
            if state == "failed":
                self.failed.append(task)
                if task not in self.tasks:
                    self.tasks.append(task)
        self._changed(task)

    def _changed(self, task: Task) -> None:
        if not self.verbose and task in self.tasks:
            self.progress.changed(task)

    def _subprocess(self, original):
        def run_local_subprocess(full_command, env_vars=None) -> int:
            task = getattr(self._current, "task", None)
            sink = task.log if task is not None and task.log else self._pipeline_log
            if task is not None:
                task.attempts += 1
                if task.attempts > 1:
                    self._changed(task)
            env = {**os.environ, **env_vars} if env_vars else None
            with subprocess.Popen(
                full_command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                env=env,
            ) as process:
                for line in iter(process.stdout.readline, ""):
                    sink.write(line)
                    if task is not None:
                        task.tail.append(line)
                    if self.verbose:
                        print(line, end="")  # kfp.local's indented print, as it streams
                if self.verbose:
                    print("\n")
                return process.wait()

        return run_local_subprocess

    def _restore_logging(self, root: logging.Logger, handlers, level) -> None:
        root.handlers[:] = handlers
        root.setLevel(level)

    def _close(self) -> None:
        if not self.verbose and self.run_dir is not None:
            self.progress.finish()
        if self._pipeline_log is not None:
            self._pipeline_log.close()
        elif self._early:  # the run stopped before it had a folder: show what kfp said
            sys.stderr.write("".join(self._early))


def _loop_item(task_spec, io_store) -> Any:
    """The ParallelFor item an iteration's task takes (a category, say), if it is a plain value."""
    for spec in task_spec.inputs.parameters.values():
        if spec.component_input_parameter.endswith("-loop-item"):
            try:
                value = io_store.get_parent_input(spec.component_input_parameter)
            except Exception:  # kfp.local keeps loop items under other keys too
                return None
            return value if isinstance(value, str | int | float) else None
    return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60] or "item"
