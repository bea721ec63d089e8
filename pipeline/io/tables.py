"""Parquet tables through fsspec: the predictions table, read with filters so memory stays bounded."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.errors import SegpipeError
from pipeline.io.fs import atomic_write, is_hidden, url_to_fs
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
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise SegpipeError(f"{uri}: no column {missing[0]!r} (columns: {', '.join(dataset.schema.names)})")
    try:
        return dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise SegpipeError(f"{uri}: cannot be read as Parquet ({error})") from None


def read_predictions(files: Sequence[str], image_ids: Sequence[int] | None = None) -> list[ImagePrediction]:
    """The predictions of `image_ids` (all images when None) from Parquet files of the predictions table.

    The filter is pushed down to Parquet row groups, so reading a shard's images does not load the table.
    """
    dataset = _dataset(files)
    row_filter = None if image_ids is None else ds.field("image_id").isin(list(image_ids))
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
