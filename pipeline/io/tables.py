"""Parquet tables through fsspec: predictions and ground-truth datasets, read with filters so memory stays bounded."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.errors import SegpipeError
from pipeline.io.fs import atomic_write, is_hidden, join, url_to_fs
from pipeline.schemas import arrow_schema
from pipeline.structures import ImagePrediction, predictions_from_arrow, predictions_to_arrow


def write_predictions(uri: str, predictions: Iterable[ImagePrediction], run_id: str, model: str) -> int:
    """One Parquet file of the predictions table, committed atomically; returns the row count."""
    table = predictions_to_arrow(predictions, run_id, model)
    with atomic_write(uri) as f:
        pq.write_table(table, f)
    return table.num_rows


def _dataset(files: Sequence[str]) -> ds.Dataset:
    fs, _ = url_to_fs(files[0])
    try:
        return ds.dataset([url_to_fs(f)[1] for f in files], format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs)))
    except (pa.ArrowInvalid, OSError) as error:
        raise SegpipeError(f"{files[0]}: cannot be read as Parquet ({error})") from None


def read_columns(uri: str, columns: list[str]) -> pa.Table:
    """Some columns of one Parquet file."""
    dataset = _dataset([uri])
    _require_columns(uri, dataset.schema, columns)
    try:
        return dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise SegpipeError(f"{uri}: cannot be read as Parquet ({error})") from None


def read_predictions(files: Sequence[str], image_ids: Sequence[int] | None = None,
                     file_names: Sequence[str] | None = None) -> list[ImagePrediction]:
    """The predictions of `image_ids` or of `file_names` (all images when neither) from Parquet files of the
    predictions table.

    The filter is pushed down to Parquet row groups, so reading a shard's images does not load the table.
    """
    dataset = _dataset(files)
    row_filter = None if image_ids is None else ds.field("image_id").isin(list(image_ids))
    if file_names is not None:
        by_name = ds.field("file_name").isin(list(file_names))
        row_filter = by_name if row_filter is None else row_filter & by_name
    try:
        table = dataset.to_table(filter=row_filter)
    except (pa.ArrowInvalid, OSError) as error:
        raise SegpipeError(f"{files[0]}: cannot be read as Parquet ({error})") from None
    return predictions_from_arrow(table)


def parquet_files(pred: str) -> list[str]:
    """The Parquet files of a predictions table (a file or a folder of them); [] for a JSON file."""
    fs, path = url_to_fs(pred)
    if path.endswith(".parquet"):
        if not fs.isfile(path):
            raise SegpipeError(f"{pred}: no such file")
        return [fs.unstrip_protocol(path)]
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and not is_hidden(p[len(path):]))
        if not files:
            raise SegpipeError(f"{pred}: a folder without .parquet files")
        return [fs.unstrip_protocol(p) for p in files]
    return []


def _require_columns(uri: str, schema: pa.Schema, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise SegpipeError(f"{uri}: no column {missing[0]!r} (columns: {', '.join(schema.names)})")


# --- Dataset tables: a folder with segments.parquet and images.parquet -------------------------

SEGMENTS_FILE = "segments.parquet"
IMAGES_FILE = "images.parquet"
KIND_KEY = "segpipe.kind"  # Parquet key-value metadata: "instances" or "panoptic"
COCO_KEY = "segpipe.coco"  # ... and the COCO file's top-level content but images and annotations, as JSON
WRITE_KEY = "segpipe.write"  # ... and one id per write, the same in both files


@dataclass(frozen=True)
class DatasetTable:
    """A ground-truth dataset table (schemas/segments.json, schemas/images.json), opened and checked.

    Holds no open file, so it pickles to Ray workers; each read opens the file and reads its footer.
    """

    uri: str
    kind: str  # "instances" or "panoptic"
    categories: list[dict]  # as in the COCO file, every key kept
    coco: dict  # the COCO file's top-level content but images and annotations (info, licenses, categories, ...)

    def images(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The images table (one small row per image), in image-id order."""
        uri = join(self.uri, IMAGES_FILE)
        with _parquet_file(uri) as file:
            return file.read(columns=_columns(uri, file, columns))

    def segments(self, image_ids: Sequence[int] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """The segment rows of `image_ids` (all rows when None), in image-id order, then file order.

        Only the row groups whose image_id statistics can hold one of the ids are read.
        """
        uri = join(self.uri, SEGMENTS_FILE)
        with _parquet_file(uri) as file:
            names = _columns(uri, file, columns)
            if image_ids is None:
                return file.read(columns=names)
            wanted = np.unique(np.asarray(image_ids, np.int64))
            read = names if "image_id" in names else [*names, "image_id"]
            groups = row_groups_holding(file.metadata, wanted)
            table = file.read_row_groups(groups, columns=read) if groups else file.schema_arrow.empty_table().select(read)
            return table.filter(pc.is_in(table["image_id"], pa.array(wanted))).select(names)


def row_groups_holding(metadata: pq.FileMetaData, image_ids: np.ndarray) -> list[int]:
    """Row groups whose image_id range [min, max] holds one of the sorted `image_ids` (all without statistics)."""
    if metadata.num_row_groups == 0:
        return []
    first = metadata.row_group(0)
    column = next(i for i in range(first.num_columns) if first.column(i).path_in_schema == "image_id")
    groups = []
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max or (
                np.searchsorted(image_ids, stats.min) < np.searchsorted(image_ids, stats.max, "right")):
            groups.append(group)
    return groups


def is_dataset_table(uri: str) -> bool:
    """True for a folder holding segments.parquet and images.parquet."""
    fs, path = url_to_fs(uri)
    return all(fs.isfile(join(path, name)) for name in (SEGMENTS_FILE, IMAGES_FILE))


def open_dataset_table(uri: str) -> DatasetTable:
    """A dataset table's kind and COCO content, after checking both files' schema names and versions."""
    fs, path = url_to_fs(uri)
    if not fs.isdir(path):
        raise SegpipeError(f"{uri}: not a segpipe dataset table (a folder holding {SEGMENTS_FILE} and {IMAGES_FILE})")
    segments = _checked_metadata(join(uri, SEGMENTS_FILE), "segments")
    metadata = _checked_metadata(join(uri, IMAGES_FILE), "images")
    if segments.get(WRITE_KEY) != metadata.get(WRITE_KEY):
        raise SegpipeError(f"{uri}: {SEGMENTS_FILE} and {IMAGES_FILE} come from two different writes (one died "
                           "between its two commits?): convert again")
    try:
        kind, coco = metadata[KIND_KEY], json.loads(metadata[COCO_KEY])
    except (KeyError, ValueError):
        raise SegpipeError(f"{join(uri, IMAGES_FILE)}: no valid '{KIND_KEY}' and '{COCO_KEY}' metadata") from None
    return DatasetTable(uri, kind, coco.get("categories", []), coco)


def _checked_metadata(uri: str, name: str) -> dict[str, str]:
    with _parquet_file(uri) as file:
        metadata = {k.decode(): v.decode() for k, v in (file.schema_arrow.metadata or {}).items()}
    if metadata.get("segpipe.schema") != name:
        raise SegpipeError(f"{uri}: not a segpipe {name} table (its schema is {metadata.get('segpipe.schema')!r})")
    supported = int(arrow_schema(name).metadata[b"segpipe.version"])
    version = metadata.get("segpipe.version", "")
    if not version.isdigit() or int(version) > supported:
        raise SegpipeError(f"{uri}: {name} table version {version!r}; this segpipe reads versions up to {supported} "
                           "(upgrade segpipe)")
    return metadata


@contextmanager
def _parquet_file(uri: str) -> Iterator[pq.ParquetFile]:
    """An open Parquet file; reading it fails as one SegpipeError naming the file."""
    fs, path = url_to_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            yield pq.ParquetFile(f)
    except FileNotFoundError:
        raise SegpipeError(f"{uri}: no such file") from None
    except (pa.ArrowInvalid, OSError) as error:
        raise SegpipeError(f"{uri}: cannot be read as Parquet ({error})") from None


def _columns(uri: str, file: pq.ParquetFile, columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        return file.schema_arrow.names
    _require_columns(uri, file.schema_arrow, columns)
    return list(columns)


def write_dataset_table(uri: str, kind: str, coco: dict, chunks: Iterable[tuple[pa.Table, pa.Table]]) -> tuple[int, int]:
    """Write a dataset table folder from (images, segments) chunks, one row group each; returns the row counts.

    Chunks must come in image-id order. Rows stream to the files, so memory holds one chunk; each file is
    committed atomically when all chunks are written (object stores: one upload, buffered in memory). Both
    files carry one write id, so a pair from two writes (one died between its two commits) is refused on open.
    """
    metadata = {KIND_KEY: kind, COCO_KEY: json.dumps(coco, separators=(",", ":")), WRITE_KEY: uuid.uuid4().hex}
    counts = [0, 0]
    with ExitStack() as stack:
        writers = []
        for name, file in (("images", IMAGES_FILE), ("segments", SEGMENTS_FILE)):
            schema = arrow_schema(name)
            sink = stack.enter_context(atomic_write(join(uri, file)))
            writers.append(stack.enter_context(pq.ParquetWriter(sink, schema.with_metadata({**schema.metadata, **metadata}))))
        for chunk in chunks:
            for i, (writer, table) in enumerate(zip(writers, chunk)):
                if table.num_rows:
                    writer.write_table(table, row_group_size=table.num_rows)
                    counts[i] += table.num_rows
    return counts[0], counts[1]


def read_rows(files: Sequence[str], first: int, last: int, columns: list[str]) -> pa.Table:
    """The rows with `first <= image_id <= last` from Parquet files, only `columns`: the filter prunes row groups
    by their image_id statistics (tables are written in image-id order) and reads no other row group."""
    dataset = _dataset(files)
    field = ds.field("image_id")
    try:
        return dataset.to_table(columns=columns, filter=(field >= first) & (field <= last))
    except (pa.ArrowInvalid, OSError) as error:
        raise SegpipeError(f"{files[0]}: cannot be read as Parquet ({error})") from None
