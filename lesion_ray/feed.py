"""The listing fed to Ray Data as it goes (predict's streaming discovery): the driver puts listing pages of
``(id, source)`` into a queue (:func:`fill`), at most :data:`LEAD` images ahead of the finished rows
(:class:`Window`); short read tasks take the pages and hand them on as blocks (:func:`dataset`). ray and
pyarrow only: the read tasks' processes never import torch.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.queue import Full, Queue

# Ray Data hands a read task's blocks on only when they add up to its target block size (128 MiB) or the
# task ends: a task that read listing pages until the listing ended would hold back every image. So a pass
# reads through READ_TASKS short tasks, READERS at a time, the first taking one page (the first images move
# at once), the next ones more, up to PAGES_PER_READ; a listing longer than a pass (2,080 pages: about 2 M
# images) takes more passes.
READERS = 2
READ_TASKS = 64
PAGES_PER_READ = 64
QUEUED_PAGES = 2 * READERS  # pages the queue holds, at most
# Images listed but not yet written, at most: the listing runs this far ahead of the pipeline (more than the
# readers hold), so the driver never admits millions of objects before their images are decoded.
LEAD = 4 * READERS * PAGES_PER_READ * 1000
# max_retries, which the read tasks need, has no named parameter in Ray 2.60: ray_remote_args stays.
warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)


class QueueLost(RuntimeError):
    """The queue's actor is gone (with its node, say): the pass fails and predict runs what is left again. Raised
    by read tasks in place of Ray's actor error, which does not survive the way back to the driver."""


def new_queue() -> Queue:
    """The queue between the listing and the read tasks (a Ray actor). No CPU for it: it must start even while a
    failed pass's actors still hold every CPU."""
    return Queue(maxsize=QUEUED_PAGES, actor_options={"num_cpus": 0})


def dataset(queue: Queue, batch_size: int) -> ray.data.Dataset:
    """A dataset of the queue's pages: rows ``id``, ``source`` and (empty) ``masks``, blocks of ``batch_size``."""
    # No CPU for the read tasks: they only pass pages on, and must not keep decoding tasks from a core.
    # As many blocks as read tasks: Ray Data would otherwise split each task's output into many small blocks.
    # No retries of a read task (Ray Data retries tasks without limit): a rerun would take new pages from the
    # queue and leave those its first run took undone; a lost reader fails the pass, which predict reruns.
    return ray.data.read_datasource(QueueSource(queue, batch_size), override_num_blocks=READ_TASKS,
                                    concurrency=READERS, num_cpus=0, ray_remote_args={"max_retries": 0})


class QueueSource(Datasource):
    """A Ray Data source fed as the listing goes: ``READ_TASKS`` read tasks, each taking up to a few pages
    of ``(id, source)`` from a queue, handed on as blocks of ``batch_size`` source rows (so that a short
    listing still spreads over every inference actor); ``None`` in the queue is the end of the listing."""

    def __init__(self, queue: Queue, batch_size: int) -> None:
        super().__init__()
        self.queue, self.batch_size = queue, batch_size

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(functools.partial(_read_pages, self.queue, self.batch_size, min(1 + i, PAGES_PER_READ)),
                         metadata) for i in range(READ_TASKS)]


def _read_pages(queue: Queue, batch_size: int, pages: int) -> Iterator[pa.Table]:
    for _ in range(pages):
        try:
            if (page := queue.get()) is None:
                queue.put(None)  # the end of the listing, for the read tasks after this one
                return
        except ray.exceptions.RayActorError as exc:
            raise QueueLost(f"the listing's queue is lost: {str(exc).splitlines()[0]}") from None
        for start in range(0, len(page), batch_size):
            chunk = page[start : start + batch_size]
            yield pa.table({"id": [i for i, _ in chunk], "source": [s for _, s in chunk],
                            "masks": pa.array([[]] * len(chunk), pa.list_(pa.string()))})


class Window:
    """How many images are between the listing and their finished rows; the listing waits at ``LEAD``."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.largest_page = 0
        self._changed = threading.Condition()

    def enter(self, images: int, stop: threading.Event) -> bool:
        with self._changed:
            self.largest_page = max(self.largest_page, images)
            while self.in_flight and self.in_flight + images > LEAD and not stop.is_set():
                self._changed.wait(0.5)
            self.in_flight += images
        return not stop.is_set()

    def leave(self, images: int) -> None:
        with self._changed:
            self.in_flight -= images
            self._changed.notify_all()

    def unread_at_most(self) -> int:
        """Images no read task has taken, at most, once a pass has ended: the queue's pages and the one the
        listing is putting. Beyond that, images a read task took did not come back."""
        return (QUEUED_PAGES + 1) * self.largest_page


def fill(pages: Iterable[list[tuple[str, str]]], queue: Queue, window: Window, stop: threading.Event,
         failures: list[BaseException]) -> None:
    """Put the listing's pages into ``queue`` until it ends (or ``stop``), then the end mark. A failure (of
    the listing, or of the queue after ``stop``) is left in ``failures`` for the driver."""
    try:
        try:
            for page in pages:
                if not window.enter(len(page), stop) or not _put(queue, page, stop):
                    return
        finally:  # the readers end at the mark, the listing complete or not
            _put(queue, None, stop)
    except BaseException as exc:
        failures.append(exc)


def _put(queue: Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` into ``queue`` as soon as it has room, unless ``stop`` is set first."""
    while not stop.is_set():
        with contextlib.suppress(Full):
            queue.put(item, timeout=0.5)
            return True
    return False
