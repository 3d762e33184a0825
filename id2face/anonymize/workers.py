"""Where the pipeline's calls run: in the caller's thread, in a pool of file threads, or in stage
worker threads with a CUDA stream each; same results either way."""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator

import torch


class InlineExecutor:
    """``concurrent.futures.Executor.submit`` that runs the call at once, in the caller's thread."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - delivered through the future, as a pool would
            future.set_exception(err)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


# The stages' streams outrank the default stream, where the sampler queues its UNet kernels: those
# keep every SM busy, block after block, and a stage's few small kernels (detection, encoding,
# paste-back) would otherwise wait for free SMs behind them before each of the stage's host reads.
# The GPU's block scheduler takes a higher-priority stream's blocks first; the sampler loses only
# the time those kernels take anyway. (CUDA: lower is higher; torch clamps to the device's range.)
STAGE_STREAM_PRIORITY = -1


class StageWorker:
    """Runs one pipeline stage's calls: in the caller's thread, in order (``threaded`` false), or in
    ``threads`` worker threads (one: in order), each on a GPU with a CUDA stream of its own (its host
    reads then wait for its own kernels only, not for the sampling queued on the default stream;
    ``STAGE_STREAM_PRIORITY``) that is synchronized before a call's future completes, so another
    stage reads finished results."""

    def __init__(self, threaded: bool, device: torch.device, name: str, threads: int = 1):
        self._device = device
        self._streams = None
        self._pool = InlineExecutor()
        if threaded:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"id2face-{name}")
            self._streams = threading.local() if device.type == "cuda" else None

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(self._call, fn, *args)

    def _call(self, fn: Callable, *args):
        if self._streams is None:
            return fn(*args)
        if not hasattr(self._streams, "stream"):
            self._streams.stream = torch.cuda.Stream(self._device, priority=STAGE_STREAM_PRIORITY)
        stream = self._streams.stream
        with torch.cuda.stream(stream):
            result = fn(*args)
            stream.synchronize()
        return result

    def __enter__(self) -> "StageWorker":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.__exit__(*exc)  # a thread pool waits for its calls


def io_executor(workers: int):
    """Threads for decoding inputs and encoding outputs (PIL and zlib release the GIL there), so a
    photo's file work overlaps the model's; 0: everything in the caller's thread, in order."""
    if workers <= 0:
        return InlineExecutor()
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="id2face-io")


def ahead(submit: Callable[[Any], Future], items: Iterable, depth: int) -> Iterator[tuple[Any, Future]]:
    """``(item, submit(item))`` in order, with up to ``depth`` items submitted ahead."""
    window: deque = deque()
    for item in items:
        window.append((item, submit(item)))
        if len(window) > depth:
            yield window.popleft()
    while window:
        yield window.popleft()
