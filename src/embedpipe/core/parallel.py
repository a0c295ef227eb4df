"""Ordered, bounded parallel map over chunks in worker processes.

Results come back in input order; at most ``chunks_in_flight_per_worker``
chunks per worker are pending at once, so memory stays flat whatever the
input length. One worker runs inline: no pickling, easy to debug.
"""

import collections
import itertools
import os
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


def executor_for(workers: int) -> Executor:
    count = worker_count(workers)
    if count == 1:
        return InlineExecutor()
    # forkserver: workers never inherit pyarrow's or boto3's threads.
    return ProcessPoolExecutor(count, mp_context=get_context("forkserver"))


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
