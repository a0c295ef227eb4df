"""Ordered, bounded parallel map over chunks in worker processes.

Results come back in input order; at most ``chunks_in_flight_per_worker``
chunks per worker are pending at once, so memory stays flat whatever the
input length. One worker runs inline: no pickling, easy to debug. Workers exit
when the process that started them dies, even by SIGKILL.
"""

import collections
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class InlineExecutor(Executor):
    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)
        return future


def worker_count(workers: int) -> int:
    """``0`` means one worker per CPU core."""
    return workers or os.cpu_count() or 1


PARENT_POLL_SECONDS = 0.5


def executor_for(workers: int) -> Executor:
    count = worker_count(workers)
    if count == 1:
        return InlineExecutor()
    # forkserver: workers never inherit pyarrow's or boto3's threads.
    return ProcessPoolExecutor(
        count,
        mp_context=get_context("forkserver"),
        initializer=exit_with_parent,
        initargs=(os.getpid(), _start_time(os.getpid())),
    )


def exit_with_parent(parent_pid: int, parent_started: str | None) -> None:
    """Worker initializer: a thread that ends this worker once ``parent_pid`` is gone.

    A pool worker's parent is the forkserver, not the process that owns the pool, and
    each worker holds the write ends of the pool's queue and of the forkserver's
    liveness pipe: when the owner is killed, nobody sees EOF and the workers and the
    forkserver would wait under PID 1 forever. Once the workers exit, the forkserver and
    the resource tracker see EOF and exit too.
    """

    def watch() -> None:
        while _alive(parent_pid, parent_started):
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks, which tells a reused pid apart."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, started: str | None) -> bool:
    if started is not None:
        fields = _stat(pid)
        # A killed owner not yet reaped by its own parent is a zombie: gone for us.
        return fields is not None and fields[0] != "Z" and fields[19] == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def chunked(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def map_chunks(
    function: Callable[[list], list[Result]],
    chunks: Iterable[tuple[object, list]],
    workers: int,
    chunks_in_flight_per_worker: int = 3,
) -> Iterator[tuple[object, list[Result]]]:
    """Apply ``function`` to each ``(context, payload)`` chunk's payload in worker processes.

    Yields ``(context, results)`` in input order; ``context`` stays in this process.
    """
    window = worker_count(workers) * chunks_in_flight_per_worker
    pending: collections.deque = collections.deque()
    with executor_for(workers) as executor:
        for context, payload in chunks:
            pending.append((context, executor.submit(function, payload)))
            if len(pending) >= window:
                context, future = pending.popleft()
                yield context, future.result()
        while pending:
            context, future = pending.popleft()
            yield context, future.result()
