"""fsspec I/O: folders, tar shards and Parquet at file://, memory:// and s3:// (moto server); atomic commits."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import SegpipeError
from pipeline.io.fs import atomic_write, read_json, write_bytes
from pipeline.io.shards import list_shards, read_shard, write_tar_shard
from pipeline.synth import SynthConfig, write_dataset
from pipeline.validate import validate


def _images(uri, **kwargs):
    return {r.key: r.data for shard in list_shards(uri, **kwargs) for r in read_shard(shard)}


def _write_parquet(uri, images):
    table = pa.table({"file_name": list(images), "image": list(images.values())})
    with atomic_write(uri) as f:
        pq.write_table(table, f, row_group_size=3)


def test_folder_tar_and_parquet_give_the_same_images_on_disk_and_in_memory(dataset):
    expected = _images(str(dataset / "val"))
    assert len(expected) == 12
    folder_shards = list_shards(str(dataset / "val"), files_per_shard=5)
    assert [len(s.members) for s in folder_shards] == [5, 5, 2]
    assert _images(f"file://{dataset}/shards") == expected
    assert _images(f"{dataset}/shards/val-*.tar") == expected
    memory = "memory://io-test"
    write_tar_shard(f"{memory}/shards/a.tar", sorted(expected.items()))
    assert _images(f"{memory}/shards") == expected
    _write_parquet(f"{memory}/parquet/part-0.parquet", expected)
    assert _images(f"{memory}/parquet") == expected


def test_parquet_with_a_hugging_face_image_struct_is_read(tmp_path):
    images = {"a.jpg": b"\xff\xd8one", "b.jpg": b"\xff\xd8two"}
    struct = pa.array([{"bytes": v, "path": k} for k, v in images.items()])
    pq.write_table(pa.table({"file_name": list(images), "image": struct}), tmp_path / "x.parquet")
    assert _images(str(tmp_path / "x.parquet")) == images


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(SegpipeError, match="no such file or folder"):
        list_shards(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SegpipeError, match="holds no images"):
        list_shards(str(tmp_path))
    pq.write_table(pa.table({"name": ["a"], "pixels": [b"x"]}), tmp_path / "p.parquet")
    with pytest.raises(SegpipeError, match="no column 'image' \\(columns: name, pixels\\)"):
        list(read_shard(list_shards(str(tmp_path / "p.parquet"))[0]))
    (tmp_path / "bad.json").write_text('{"images": [1,]}')
    with pytest.raises(SegpipeError, match="bad.json: invalid JSON at line 1 column 14: trailing comma"):
        read_json(str(tmp_path / "bad.json"))


def test_s3_dataset_round_trip_through_a_real_s3_api(s3_bucket, dataset):
    root = f"s3://{s3_bucket}/synth"
    counts = write_dataset(root, SynthConfig(images=6, split="val", seed=7, shard_size=4,
                                             crowd_probability=1.0, void_probability=1.0))
    assert counts["images"] == 6 and counts["shards"] == 2
    fs = fsspec.filesystem("s3")
    assert sorted(fs.ls(f"{s3_bucket}/synth/shards")) == [
        f"{s3_bucket}/synth/shards/val-00000.tar", f"{s3_bucket}/synth/shards/val-00001.tar"]
    from_s3 = _images(f"{root}/shards")
    assert from_s3 == _images(f"{root}/val")
    # The first six images are those of the local 12-image dataset made with the same settings.
    local = _images(str(dataset / "val"))
    assert all(local[k] == v for k, v in from_s3.items()) and len(from_s3) == 6
    _write_parquet(f"{root}/parquet/part-0.parquet", from_s3)
    assert _images(f"{root}/parquet") == from_s3
    assert validate(f"{root}/annotations/panoptic_val.json").problems == []
    assert validate(f"{root}/annotations/instances_val.json", images_folder=f"{root}/val").problems == []


def test_atomic_write_that_fails_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out" / "data.json"
    write_bytes(str(target), b"old")
    for uri in (str(target), "memory://atomic/data.json"):
        with pytest.raises(RuntimeError):
            with atomic_write(uri) as f:
                f.write(b"half of the new")
                raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["data.json"]
    assert not fsspec.filesystem("memory").exists("/atomic/data.json")
    with atomic_write(str(target), "w") as f:
        json.dump({"new": True}, f)
    assert json.loads(target.read_text()) == {"new": True}


def test_writer_killed_midway_leaves_no_partial_file_visible(tmp_path):
    target = tmp_path / "shards" / "part.tar"
    (tmp_path / "shards" / "done.tar").parent.mkdir()
    write_tar_shard(str(tmp_path / "shards" / "done.tar"), [("a.jpg", b"jpeg")])
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pipeline.io.shards import write_tar_shard
        def members():
            yield "b.jpg", b"x" * 100_000
            print("half written", flush=True)
            time.sleep(120)
            yield "c.jpg", b"never"
        write_tar_shard({str(target)!r}, members())
    """)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "half written"
    leftovers = [n for n in os.listdir(target.parent) if n != "done.tar"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".part.tar.")  # the hidden temporary
    assert os.path.getsize(target.parent / leftovers[0]) > 50_000  # bytes really were on disk
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not target.exists()
    # Readers never see the temporary: only the committed shard is listed and read.
    assert [s.uri.rsplit("/", 1)[1] for s in list_shards(str(target.parent))] == ["done.tar"]
    assert _images(str(target.parent)) == {"a.jpg": b"jpeg"}
