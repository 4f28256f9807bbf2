"""The predict manifest: one row per listed object, kept on disk while the work goes on.

Rows go to Parquet parts in ``manifest_parts/`` as they are made: the workers write the rows of the
images they finish, the driver those of the objects discovery refuses (duplicates, unsupported types,
oversize objects) or skips (objects that are not images). The driver's bookkeeping lives in a
:class:`Ledger`, an SQLite file on its local disk, so its memory does not grow with the archive: the
objects listed, the first object of each id, the earlier rows that stand (resume) and the part holding
each object's row. At the end :func:`combine` streams the parts into ``manifest.parquet`` (the ok and
error rows) and ``skipped.csv`` (what is not an image, with the reason), one part at a time.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from lesion_ray import storage

MANIFEST_FILE = "manifest.parquet"
PARTS_DIR = "manifest_parts"
SKIPPED_FILE = "skipped.csv"
# Statuses of the rows in the parts; "skipped" rows end in SKIPPED_FILE, the others in MANIFEST_FILE.
OK, ERROR, SKIPPED = "ok", "error", "skipped"

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("status", pa.string()),  # ok, error (or skipped, in the parts only)
    ("error", pa.string()),  # "" when ok; the reason otherwise
    ("masks", pa.list_(pa.string())),  # output URIs: one (Task 1) or five in data.ATTRIBUTES order (Task 2)
    ("overlay", pa.string()),  # "" when none was written
    ("height", pa.int32()),  # original image size (0 when the image could not be decoded)
    ("width", pa.int32()),
    ("area_fraction", pa.list_(pa.float32())),  # share of mask pixels, per channel
    ("head1_prob", pa.list_(pa.float32())),  # attribute/lesion presence, head 1 (pooled centre block)
    ("head2_prob", pa.list_(pa.float32())),  # head 2 (max of the mask logits)
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("threshold", pa.float64()),
    ("postprocess", pa.string()),  # null in manifests from before the key existed: those rows are redone
    ("infer_ms", pa.float32()),  # this image's share of its batch's forward pass
    ("write_ms", pa.float32()),  # resize + threshold + encode + write
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("node", pa.string()),  # the Ray node id of the inference actor that handled the row
])
_BATCH = 10_000  # rows read at a time from an earlier manifest
# Rows per row group of a manifest written whole: a Parquet writer keeps every group's metadata until it closes
# (a group per 1,000-row part made the driver grow by ~30 MiB per million rows), and few groups compress better.
_ROW_GROUP = 100_000


@dataclass(frozen=True)
class Model:
    """What made a row: an earlier ok row is kept only when all of it matches."""

    name: str
    version: str
    threshold: float
    postprocess: str


def refused_rows(entries: Iterable[tuple[str, str, str, str]], model: Model) -> pa.Table:
    """Manifest rows, finished now, for objects that never reach the pipeline: ``(id, source, status, reason)``
    each."""
    now = datetime.now(timezone.utc)
    return pa.Table.from_pylist([{
        "id": image_id, "source": source, "status": status, "error": reason, "masks": [], "overlay": "",
        "height": 0, "width": 0, "area_fraction": [], "head1_prob": [], "head2_prob": [],
        "model_name": model.name, "model_version": model.version, "threshold": model.threshold,
        "postprocess": model.postprocess, "infer_ms": 0.0, "write_ms": 0.0, "finished_at": now, "node": ""}
        for image_id, source, status, reason in entries], schema=SCHEMA)


def write_part(uri: str, table: pa.Table) -> None:
    with storage.open_write(uri) as f:
        pq.write_table(table, f)


def row_files(out: str) -> Iterator[str]:
    """The files of rows under ``out``, oldest first: the manifest, then the parts (whose names start with
    their run's sortable id), streamed from the listing."""
    if storage.is_file(storage.join(out, MANIFEST_FILE)):
        yield storage.join(out, MANIFEST_FILE)
    folder = storage.join(out, PARTS_DIR)
    if storage.exists(folder):
        for page in storage.iter_listing(folder):  # key order on S3; a local folder's pages come sorted
            yield from (f.uri for f in page if f.uri.endswith(".parquet"))


def iter_batches(uri: str, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """A manifest or part ``_BATCH`` rows at a time, without reading it whole into memory, in :data:`SCHEMA`
    (a column an older manifest lacks comes as nulls)."""
    wanted = columns or SCHEMA.names
    schema = pa.schema([SCHEMA.field(name) for name in wanted])
    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        present = [name for name in wanted if name in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=_BATCH, columns=present):
            yield pa.RecordBatch.from_arrays(
                [batch[name].cast(schema.field(name).type) if name in present
                 else pa.nulls(len(batch), schema.field(name).type) for name in wanted], schema=schema)


class Ledger:
    """The driver's bookkeeping for one predict run, in an SQLite file on its local disk.

    Thread-safe: the listing thread admits objects while the main thread records finished rows.
    """

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="lesion-ray-ledger-")
        self._db = sqlite3.connect(os.path.join(self.folder, "ledger.sqlite"), check_same_thread=False,
                                   isolation_level=None)
        self._lock = threading.Lock()
        self._db.executescript("""
            PRAGMA journal_mode = MEMORY;
            PRAGMA synchronous = OFF;
            CREATE TABLE parts (part INTEGER PRIMARY KEY, uri TEXT UNIQUE);
            -- Every object listed this run; part: where its row is (NULL while it is still to do).
            CREATE TABLE objects (source TEXT PRIMARY KEY, id TEXT, part INTEGER, status TEXT);
            CREATE TABLE ids (id TEXT PRIMARY KEY, source TEXT);  -- the first object of each id
            -- Earlier ok rows that may stand, with the outputs they name, and what the output holds now.
            CREATE TABLE earlier (source TEXT PRIMARY KEY, part INTEGER);
            CREATE TABLE earlier_outputs (source TEXT, uri TEXT);
            CREATE INDEX earlier_outputs_source ON earlier_outputs (source);
            CREATE TABLE outputs (uri TEXT PRIMARY KEY);
            CREATE TEMP TABLE page (id TEXT, source TEXT PRIMARY KEY, is_image INTEGER);  -- being admitted
        """)

    def close(self) -> None:
        self._db.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _part(self, uri: str) -> int:
        self._db.execute("INSERT OR IGNORE INTO parts (uri) VALUES (?)", (uri,))
        return self._db.execute("SELECT part FROM parts WHERE uri = ?", (uri,)).fetchone()[0]

    # --- Resume ---

    def load_earlier(self, out: str, model: Model) -> int:
        """Read the rows earlier runs left under ``out`` (the manifest, then the parts: the newest row of an
        object wins) and the outputs there now; an ok row of ``model`` whose outputs all exist stands.
        Returns the number of standing rows."""
        columns = ["source", "status", "masks", "overlay", "model_name", "model_version", "threshold", "postprocess"]
        found = False
        with self._lock, self._transaction():
            for uri in row_files(out):
                found = True
                part = self._part(uri)
                for batch in iter_batches(uri, columns):
                    records = batch.to_pylist()
                    sources = [(r["source"],) for r in records]
                    self._db.executemany("DELETE FROM earlier WHERE source = ?", sources)
                    self._db.executemany("DELETE FROM earlier_outputs WHERE source = ?", sources)
                    good = [r for r in records if r["status"] == OK and Model(
                        r["model_name"], r["model_version"], r["threshold"], r["postprocess"]) == model]
                    self._db.executemany("INSERT OR REPLACE INTO earlier VALUES (?, ?)",
                                         [(r["source"], part) for r in good])
                    self._db.executemany("INSERT INTO earlier_outputs VALUES (?, ?)", [
                        (r["source"], u) for r in good for u in r["masks"] + ([r["overlay"]] if r["overlay"] else [])])
            if found:
                for page in storage.iter_listing_parallel(out):
                    self._db.executemany("INSERT OR IGNORE INTO outputs VALUES (?)", [(f.uri,) for f in page])
            self._db.execute("""DELETE FROM earlier WHERE source IN (SELECT e.source FROM earlier_outputs e
                                WHERE e.uri NOT IN (SELECT uri FROM outputs))""")
            return self._db.execute("SELECT count(*) FROM earlier").fetchone()[0]

    # --- Discovery ---

    def admit(self, objects: list[tuple[str, str, bool]]) -> list[tuple[str, str, str | None, int | None]]:
        """Record listed ``(id, source, is_image)`` objects; for each one still to do (new, or listed again
        after a failed pass and not done then): ``(id, source, first, earlier)``, where ``first`` is the image
        listed earlier with the same id (this one is a duplicate), else None, and ``earlier`` the part of a
        standing earlier row, else None. Which of two images with one id comes first is the listing's order:
        key order within a page and a key range, arrival order across ranges."""
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM page")
            self._db.executemany("INSERT OR IGNORE INTO page VALUES (?, ?, ?)", objects)
            self._db.execute("DELETE FROM page WHERE EXISTS (SELECT 1 FROM objects o WHERE o.source = page.source "
                             "AND o.part IS NOT NULL)")  # one index lookup per row, not a scan of every object
            # In listing order: the first of two images with one id in a page is the one that stays.
            self._db.execute("INSERT OR IGNORE INTO ids SELECT id, source FROM page WHERE is_image ORDER BY rowid")
            self._db.execute("INSERT OR IGNORE INTO objects (source, id) SELECT source, id FROM page")
            return self._db.execute("""
                SELECT p.id, p.source, CASE WHEN i.source = p.source THEN NULL ELSE i.source END, e.part
                FROM page p LEFT JOIN ids i ON p.is_image AND i.id = p.id LEFT JOIN earlier e ON e.source = p.source
                ORDER BY p.rowid""").fetchall()

    def record(self, done: Iterable[tuple[str, str]], part: str | int) -> None:
        """``(source, status)`` pairs whose rows lie in ``part`` (a URI, or an earlier part's number)."""
        with self._lock, self._transaction():
            number = part if isinstance(part, int) else self._part(part)
            self._db.executemany("UPDATE objects SET part = ?, status = ? WHERE source = ?",
                                 [(number, status, source) for source, status in done])

    def pending(self) -> Iterator[list[tuple[str, str]]]:
        """The objects still to do, ``(id, source)`` a thousand at a time."""
        after = 0
        while True:
            with self._lock:
                rows = self._db.execute("SELECT rowid, id, source FROM objects WHERE part IS NULL AND rowid > ? "
                                        "ORDER BY rowid LIMIT 1000", (after,)).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield [(image_id, source) for _, image_id, source in rows]

    def to_do(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM objects WHERE part IS NULL").fetchone()[0]

    def counts(self) -> dict[str, int]:
        """Objects per status of their row (``None``: still to do)."""
        with self._lock:
            return dict(self._db.execute("SELECT status, count(*) FROM objects GROUP BY status").fetchall())

    # --- The end ---

    def combine(self, out: str) -> tuple[int, int]:
        """Stream every object's row from the part the ledger names into ``manifest.parquet`` (ok and error
        rows) and ``skipped.csv``, then drop the parts. Returns how many rows each got."""
        counts = [0, 0]
        # The new manifest is published when its block ends, after the old one (a part here) was read.
        with _writers(out) as (writer, skipped):
            for part, uri in self._parts():
                for batch in iter_batches(uri):
                    batch = self._rows_of(batch, part)
                    is_skipped = pc.equal(batch["status"], SKIPPED)
                    writer.write(batch.filter(pc.invert(is_skipped)))
                    kept = batch.filter(is_skipped)
                    skipped.writerows(zip(kept["source"].to_pylist(), kept["error"].to_pylist(), strict=True))
                    counts[0] += len(batch) - len(kept)
                    counts[1] += len(kept)
        storage.delete(storage.join(out, PARTS_DIR))
        return counts[0], counts[1]

    def _parts(self) -> Iterator[tuple[int, str]]:
        after = 0
        while True:
            with self._lock:
                rows = self._db.execute("SELECT part, uri FROM parts WHERE part > ? ORDER BY part LIMIT 1000",
                                        (after,)).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield from rows

    def _rows_of(self, batch: pa.RecordBatch, part: int) -> pa.RecordBatch:
        """The rows of ``batch`` (from ``part``) that are their object's row of record."""
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM page")
            self._db.executemany("INSERT OR IGNORE INTO page (source) VALUES (?)",
                                 [(s,) for s in batch["source"].to_pylist()])
            mine = [s for (s,) in self._db.execute(
                # CROSS JOIN: the batch's rows looked up by key, never a scan of every object (SQLite's order)
                "SELECT p.source FROM page p CROSS JOIN objects o ON o.source = p.source WHERE o.part = ?", (part,))]
        kept = batch.filter(pc.is_in(batch["source"], value_set=pa.array(mine, pa.string())))
        if len(kept) > len(mine):  # an object twice in one earlier file: its last row
            last = {source: i for i, source in enumerate(kept["source"].to_pylist())}
            kept = kept.take(sorted(last.values()))
        return kept

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN ... COMMIT around a block (ROLLBACK on error): thousands of statements in one write."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN")

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def read(out: str) -> pa.Table:
    """The rows under ``out`` as one table, for a finished run's manifest or a small one's parts: the
    newest row of each object (the manifest first, then the parts in order)."""
    tables = [pa.Table.from_batches(list(iter_batches(uri)), SCHEMA) for uri in row_files(out)]
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    newest = {source: i for i, source in enumerate(table["source"].to_pylist())}
    return table.take(sorted(newest.values()))


def merge(outputs: list[str], to: str) -> dict[str, Any]:
    """Combine the manifests and skipped lists of several predict outputs (the shards of one archive) into
    ``to``, streamed. An object in two of them is an error: two jobs ran the same shard. Returns the counts."""
    counts = {OK: 0, ERROR: 0, SKIPPED: 0}
    with tempfile.TemporaryDirectory(prefix="lesion-ray-merge-") as folder, \
            contextlib.closing(sqlite3.connect(os.path.join(folder, "sources.sqlite"))) as seen:
        seen.execute("CREATE TABLE sources (source TEXT PRIMARY KEY, output TEXT)")
        with _writers(to) as (writer, skipped):
            for output in outputs:
                uri = storage.join(output, MANIFEST_FILE)
                if not storage.is_file(uri):
                    raise ValueError(f"no {MANIFEST_FILE} in {output}: give the outputs of finished predict runs")
                for batch in iter_batches(uri):
                    _claim(seen, batch["source"].to_pylist(), output)
                    writer.write(batch)
                    statuses = batch["status"].to_pylist()
                    counts[OK] += statuses.count(OK)
                    counts[ERROR] += statuses.count(ERROR)
                for batch in _csv_batches(storage.join(output, SKIPPED_FILE)):
                    rows = list(zip(batch["source"].to_pylist(), batch["reason"].to_pylist(), strict=True))
                    _claim(seen, [source for source, _ in rows], output)
                    skipped.writerows(rows)
                    counts[SKIPPED] += len(rows)
    return {"outputs": len(outputs), "listed": sum(counts.values()), "inputs": counts[OK] + counts[ERROR], **counts,
            "manifest": storage.join(to, MANIFEST_FILE), "skipped_list": storage.join(to, SKIPPED_FILE)}


@contextlib.contextmanager
def _writers(out: str) -> Iterator[tuple[_RowGroups, Any]]:
    """A writer of ``out``'s manifest rows and a CSV writer (header written) for its skipped list; each file is
    published whole when the block succeeds (the skipped list first), never when it fails."""
    with storage.open_write(storage.join(out, MANIFEST_FILE)) as manifest_file, \
            storage.open_write(storage.join(out, SKIPPED_FILE)) as skipped_file, \
            pq.ParquetWriter(manifest_file, SCHEMA) as writer:
        text = io.TextIOWrapper(skipped_file, encoding="utf-8", newline="")
        try:
            lines = csv.writer(text)
            lines.writerow(["source", "reason"])
            groups = _RowGroups(writer)
            yield groups, lines
            groups.flush()
        finally:
            text.flush()
            text.detach()  # the stream stays open for open_write to publish


class _RowGroups:
    """Record batches into a Parquet writer, :data:`_ROW_GROUP` rows to a row group."""

    def __init__(self, writer: pq.ParquetWriter) -> None:
        self.writer, self.batches, self.rows = writer, [], 0

    def write(self, batch: pa.RecordBatch) -> None:
        self.batches.append(batch)
        self.rows += len(batch)
        if self.rows >= _ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_batches(self.batches, SCHEMA))
        self.batches, self.rows = [], 0


def _claim(seen: sqlite3.Connection, sources: list[str], output: str) -> None:
    with seen:
        for source in sources:
            if not seen.execute("INSERT OR IGNORE INTO sources VALUES (?, ?)", (source, output)).rowcount:
                other = seen.execute("SELECT output FROM sources WHERE source = ?", (source,)).fetchone()[0]
                raise ValueError(f"{source} is in both {other} and {output}: two jobs ran the same shard, or an "
                                 "output was given twice")


def _csv_batches(uri: str) -> Iterator[pa.RecordBatch]:
    if not storage.is_file(uri):
        return
    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_stream(path) as f:
        yield from pa_csv.open_csv(f, parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                                   convert_options=pa_csv.ConvertOptions(
                                       column_types={"source": pa.string(), "reason": pa.string()}))
