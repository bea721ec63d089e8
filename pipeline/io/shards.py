"""Image shards at any URI: a folder of images, tar shards, or Parquet files with an image-bytes column."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SegpipeError
from pipeline.io.fs import atomic_write, is_hidden, join, url_to_fs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_KINDS = {".tar": "tar", ".parquet": "parquet"}


@dataclass(frozen=True)
class Shard:
    """A unit of reading: one tar or Parquet file, or a run of files from one image folder."""

    kind: str  # "folder", "tar" or "parquet"
    uri: str  # the tar or Parquet file; the folder for a folder shard
    members: tuple[str, ...] = ()  # folder shards: file names relative to `uri`


@dataclass(frozen=True)
class ImageRecord:
    """Encoded image bytes and where they came from."""

    key: str  # file name relative to the folder, tar member name, or the Parquet key column
    data: bytes
    shard: str  # URI of the shard


@dataclass(frozen=True)
class ParquetColumns:
    """Which Parquet columns hold the image bytes and the image's name."""

    image: str = "image"
    key: str = "file_name"


def _kind(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(IMAGE_SUFFIXES):
        return "image"
    return next((kind for suffix, kind in _KINDS.items() if lower.endswith(suffix)), None)


def list_shards(uri: str, files_per_shard: int = 256) -> list[Shard]:
    """The shards under `uri`: a folder, one tar or Parquet file, or a glob (`s3://b/train-*.tar`).

    A folder holds images (split into shards of `files_per_shard` files, in name order), or tar
    files, or Parquet files; hidden names (unfinished writes) are never read.
    """
    fs, path = url_to_fs(uri)
    if any(c in path for c in "*?["):
        paths = sorted(p for p in fs.glob(path) if not is_hidden(p))
    elif fs.isfile(path):
        paths = [path]
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if not is_hidden(p[len(path):]))
    else:
        raise SegpipeError(f"{uri}: no such file or folder")
    by_kind: dict[str, list[str]] = {}
    for p in paths:
        kind = _kind(p)
        if kind is not None:
            by_kind.setdefault(kind, []).append(p)
    if not by_kind:
        raise SegpipeError(f"{uri}: holds no images ({', '.join(IMAGE_SUFFIXES)}), .tar or .parquet files")
    if len(by_kind) > 1:
        raise SegpipeError(f"{uri}: mixes {' and '.join(sorted(by_kind))} files; point at one kind")
    kind, found = next(iter(by_kind.items()))
    if kind != "image":
        return [Shard(kind, fs.unstrip_protocol(p)) for p in found]
    root = path.rstrip("/") if fs.isdir(path) else path.rsplit("/", 1)[0]
    names = [p[len(root) + 1:] for p in found]
    root_uri = fs.unstrip_protocol(root)
    return [Shard("folder", root_uri, tuple(names[i:i + files_per_shard]))
            for i in range(0, len(names), files_per_shard)]


def read_shard(shard: Shard, columns: ParquetColumns = ParquetColumns()) -> Iterator[ImageRecord]:
    """The images of one shard, in stored order, streamed (a shard never sits whole in memory)."""
    fs, path = url_to_fs(shard.uri)
    if shard.kind == "folder":
        for name in shard.members:
            yield ImageRecord(name, fs.cat_file(join(path, name)), shard.uri)
    elif shard.kind == "tar":
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if member.isfile() and _kind(member.name) == "image" and not is_hidden(member.name):
                    yield ImageRecord(member.name, tar.extractfile(member).read(), shard.uri)
    elif shard.kind == "parquet":
        yield from _read_parquet(fs, path, shard.uri, columns)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")


def read_named(uri: str, names: set[str]) -> Iterator[ImageRecord]:
    """The images under `uri` whose keys are in `names`, streamed: a folder's other files are never opened,
    tar and Parquet shards are read through."""
    for shard in list_shards(uri):
        if shard.kind == "folder":
            members = tuple(m for m in shard.members if m in names)
            if not members:
                continue
            shard = Shard("folder", shard.uri, members)
        for record in read_shard(shard):
            if record.key in names:
                yield record


def _read_parquet(fs, path: str, uri: str, columns: ParquetColumns) -> Iterator[ImageRecord]:
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        for column in (columns.image, columns.key):
            if column not in names:
                raise SegpipeError(f"{uri}: no column {column!r} (columns: {', '.join(names)})")
        image_type = parquet.schema_arrow.field(columns.image).type
        if pa.types.is_struct(image_type):  # Hugging Face `Image` feature: {bytes, path}
            if image_type.get_field_index("bytes") < 0:
                raise SegpipeError(f"{uri}: column {columns.image!r} is a struct without 'bytes'")
        elif not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
            raise SegpipeError(f"{uri}: column {columns.image!r} holds {image_type}, expected image bytes")
        for batch in parquet.iter_batches(batch_size=64, columns=[columns.key, columns.image]):
            images = batch.column(columns.image)
            if pa.types.is_struct(image_type):
                images = images.field("bytes")
            for key, data in zip(batch.column(columns.key).to_pylist(), images.to_pylist()):
                yield ImageRecord(str(key), data, uri)


def write_tar_shard(uri: str, members: Iterable[tuple[str, bytes]]) -> None:
    """A tar file of (name, bytes) members, byte-for-byte reproducible, committed atomically."""
    with atomic_write(uri) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
