"""The report's scratch folder: per-image and per-detection records that shards write as Parquet parts and merges read back a piece at a time.

A shard writes its records (image fingerprints, TIDE's detections, AP's match flags) as one Parquet file per
shard and record kind, named by the shard's position, instead of sending them to the driver; a merge reads them
back in shard order, a chunk of rows or one category at a time (a pushed-down filter: each part is written
sorted by category, so a category is a few row groups). The folder is any fsspec URI the workers and the driver
both reach (OUT/.parts by default); `run` removes it when the report is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.fs import atomic_write, join, read_json, url_to_fs, write_bytes

ROW_GROUP = 4_096  # rows per row group: the unit a category filter skips or reads


@dataclass(frozen=True)
class Parts:
    """A scratch folder of Parquet parts: `kind/NNNNNNNN.parquet`, one per shard and kind of record."""

    uri: str

    def write(self, kind: str, shard: int, table: pa.Table) -> None:
        """One shard's records of one kind (an empty table too, so every shard has its file)."""
        with atomic_write(join(self.uri, kind, f"{shard:08d}.parquet")) as f:
            pq.write_table(table, f, row_group_size=ROW_GROUP)

    def write_json(self, kind: str, shard: int, value: object) -> None:
        """One shard's JSON value of one kind (a shard's entries of a COCO file)."""
        write_bytes(join(self.uri, kind, f"{shard:08d}.json"), orjson.dumps(value))

    def read_json(self, kind: str, shard: int) -> object:
        return read_json(join(self.uri, kind, f"{shard:08d}.json"))

    def read_part(self, kind: str, shard: int) -> pa.Table:
        """One shard's records of one kind."""
        fs, path = url_to_fs(join(self.uri, kind, f"{shard:08d}.parquet"))
        with fs.open(path, "rb") as f:
            return pq.read_table(f)

    def files(self, kind: str) -> list[str]:
        """The parts of `kind`, in shard order."""
        fs, path = url_to_fs(join(self.uri, kind))
        if not fs.isdir(path):
            return []
        protocol = self.uri.split("://", 1)[0] + "://" if "://" in self.uri else ""
        return [protocol + p for p in sorted(fs.glob(join(path, "*.parquet")))]

    def chunks(self, kind: str, columns: list[str] | None = None, rows: int = 65_536) -> Iterator[pa.Table]:
        """Every record of `kind` in shard order, about `rows` at a time (the parts' batches joined up to at least
        `rows`, so fewer than twice that): a search over every pair of chunks reads few of them."""
        pending, held = [], 0
        for uri in self.files(kind):
            fs, path = url_to_fs(uri)
            with fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=columns):
                    pending.append(batch)
                    held += batch.num_rows
                    if held >= rows:
                        yield pa.Table.from_batches(pending)
                        pending, held = [], 0
        if pending:
            yield pa.Table.from_batches(pending)

    def read(self, kind: str, *filters: list[tuple], columns: list[str] | None = None) -> pa.Table:
        """The records of `kind` that pass any of `filters` (each a list of (column, op, value) that all hold), in
        shard order; row groups that cannot hold one are skipped."""
        tables = []
        for uri in self.files(kind):
            fs, path = url_to_fs(uri)
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=columns, filters=list(filters)))
        return pa.concat_tables(tables)

    def remove(self) -> None:
        fs, path = url_to_fs(self.uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def category_groups(rows: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Runs of consecutive categories (first, last) of at most `budget` rows together (a category above it alone):
    what a merge reads back at once."""
    groups, first, held = [], 0, 0
    for k, n in enumerate(rows):
        if held and held + n > budget:
            groups.append((first, k - 1))
            first, held = k, 0
        held += n
    return groups + [(first, len(rows) - 1)] if len(rows) else groups


def pack_flags(flags: np.ndarray) -> np.ndarray:
    """(..., detections) flags (at most 63 per detection) as one int64 of bits per detection: a compact column."""
    packed = np.zeros(flags.shape[-1], np.int64)
    for k, row in enumerate(flags.reshape(-1, flags.shape[-1])):
        packed |= row.astype(np.int64) << k
    return packed


def unpack_flags(bits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`pack_flags` undone: (*shape, detections) flags, one bit position at a time (no 64-bit temporary per flag)."""
    flags = np.empty((int(np.prod(shape)), len(bits)), bool)
    for k in range(len(flags)):
        flags[k] = (bits >> k) & 1
    return flags.reshape(*shape, len(bits))
