"""Adaptive micro-batching: requests' images join one bounded queue, one thread runs the model on batches.

A request is admitted first (:meth:`Batcher.admit`: room for its images in the queue, or
:class:`QueueFull`), decodes its images elsewhere, then submits them and waits on a future for its
own rows. The batcher thread takes whole requests, oldest first, up to ``max_batch`` images (a
larger request runs alone, never split); once it holds the first, it waits at most ``max_wait_ms``
for more, and only while other admitted requests are still on their way (decoding), so a lone
request never waits. ``max_batch=1`` runs each request on its own, in arrival order.

    batcher = Batcher(predict, max_batch=16, max_wait_ms=5, max_queue=128)
    ticket = batcher.admit(2)                             # QueueFull when there is no room: answer 503
    rows = batcher.submit(ticket, images).result()        # one row per image of this request
    ticket.release()                                      # always (a no-op once the model took them)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np


class QueueFull(Exception):
    """The queue has no room for a request's images; it was not admitted."""


class Ticket:
    """Room for ``size`` images in the queue, held from admission until the model takes them or the request ends."""

    def __init__(self, batcher: Batcher, size: int) -> None:
        self.batcher, self.size = batcher, size
        self.released = False
        self.job: _Job | None = None

    def release(self) -> None:
        """Give the room back; a job still waiting in the queue is dropped (its future cancelled)."""
        self.batcher._release(self)


class _Job:
    __slots__ = ("images", "future", "ticket")

    def __init__(self, images: np.ndarray, ticket: Ticket) -> None:
        self.images, self.ticket = images, ticket
        self.future: Future[list[Any]] = Future()


class Batcher:
    """Runs ``predict(images) -> rows`` (one row per image) on batches of queued requests, in one thread.

    ``max_queue`` bounds the images admitted and not yet taken by the model (decoding or queued);
    a request is admitted when its images fit, or when nothing is queued (so one larger than
    ``max_queue`` still runs). ``on_batch(images)`` and ``on_depth(depth)`` report to metrics.

        batcher = Batcher(predictor, max_batch=16, max_wait_ms=5, max_queue=128); ...; batcher.close()
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], Sequence[Any]],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 128,
        on_batch: Callable[[int], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        for option, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be a positive integer, got {value!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, int | float) or not 0 <= max_wait_ms < 60_000:
            raise ValueError(f"max_wait_ms must be a number of milliseconds in [0, 60000), got {max_wait_ms!r}")
        self.predict = predict
        self.max_batch, self.max_wait_ms, self.max_queue = max_batch, max_wait_ms, max_queue
        self._on_batch, self._on_depth = on_batch or (lambda n: None), on_depth or (lambda n: None)
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._depth = 0  # images admitted and not yet taken by the model
        self._queued = 0  # of those, the images already submitted (in self._jobs)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="manyheads-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Images admitted and not yet taken by the model (decoding or queued)."""
        return self._depth

    def admit(self, size: int) -> Ticket:
        """Room for ``size`` images, or :class:`QueueFull`; release the ticket when the request ends."""
        with self._cond:
            if self._closed:
                raise QueueFull("the service is shutting down")
            if self._depth and self._depth + size > self.max_queue:
                raise QueueFull(f"the queue is full ({self._depth} images waiting, room for {self.max_queue})")
            self._depth += size
            self._on_depth(self._depth)
        return Ticket(self, size)

    def submit(self, ticket: Ticket, images: np.ndarray) -> Future[list[Any]]:
        """Queue the admitted request's images; the future gives its rows, in order."""
        if len(images) != ticket.size:
            raise ValueError(f"the ticket has room for {ticket.size} images, got {len(images)}")
        job = _Job(images, ticket)
        with self._cond:
            if ticket.released or ticket.job is not None:
                raise ValueError("this ticket was already released or used")
            ticket.job = job
            self._jobs.append(job)
            self._queued += ticket.size
            self._cond.notify_all()
        return job.future

    def close(self) -> None:
        """Run what is queued, then stop the thread; admitting afterwards is an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.released:
                return
            ticket.released = True
            self._depth -= ticket.size
            job = ticket.job
            if job is not None and job in self._jobs:  # the request gave up (timed out) while queued
                self._jobs.remove(job)
                self._queued -= ticket.size
                job.future.cancel()
            self._on_depth(self._depth)
            self._cond.notify_all()

    def _pop(self, batch: list[_Job], size: int) -> int:
        """Move the queued jobs that fit into ``batch`` (the first always fits); the batch's new size."""
        while self._jobs and (not batch or size + len(self._jobs[0].images) <= self.max_batch):
            job = self._jobs.popleft()
            self._queued -= job.ticket.size
            self._release(job.ticket)  # taken by the model: its room goes back to the queue
            if job.future.set_running_or_notify_cancel():  # False: the request gave up waiting
                batch.append(job)
                size += len(job.images)
        return size

    def _take(self) -> list[_Job]:
        """The next batch: wait for a job, then gather more while there is room, more are coming and time is left."""
        batch: list[_Job] = []
        size, deadline = 0, None
        with self._cond:
            while True:
                size = self._pop(batch, size)
                if not batch:
                    if self._closed:
                        return batch
                    self._cond.wait()
                    continue
                deadline = deadline or time.monotonic() + self.max_wait_ms / 1000  # from the first job taken
                coming = self._depth - self._queued  # admitted, still decoding
                left = deadline - time.monotonic()
                if size >= self.max_batch or self._jobs or not coming or left <= 0 or self._closed:
                    return batch
                self._cond.wait(left)

    def _loop(self) -> None:
        while batch := self._take():
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        images = batch[0].images if len(batch) == 1 else np.concatenate([job.images for job in batch])
        self._on_batch(len(images))
        try:
            rows = self.predict(images)
        except Exception as error:  # the model failed: every request of the batch hears why; the thread goes on
            for job in batch:
                job.future.set_exception(error)
            return
        start = 0
        for job in batch:
            job.future.set_result(list(rows[start : start + len(job.images)]))
            start += len(job.images)
