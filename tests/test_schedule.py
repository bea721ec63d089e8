"""`segpipe schedule`: ticks label each shard exactly once, on local files and on S3 (moto's server on loopback),
against one real Ray cluster (`ray start --head`) that every tick, in this process or another, joins."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from types import SimpleNamespace

import fsspec
import pytest
from typer.testing import CliRunner

from conftest import _session_members
from pipeline.cli import app
from pipeline.jobs import load
from pipeline.jobs.leases import acquire, held, holder, renew, state
from pipeline.synth import SynthConfig, write_dataset

SHARDS = 6  # tar shards of 2 images each, image ids 1..12


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3_endpoint):
    """`ray start --head` on loopback (4 logical CPUs: two ticks' pipelines at once), its workers given the S3
    endpoint; token authentication off, as for a cluster on a private network."""
    env = {"RAY_AUTH_MODE": "disabled", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": s3_endpoint}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    port = _free_port()
    process = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", "--num-cpus", "4",
         "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-port", str(_free_port()),
         "--ray-client-server-port", str(_free_port()), "--include-dashboard=false", "--disable-usage-stats",
         "--temp-dir", str(tmp_path_factory.mktemp("ray"))],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        while _session_members(process.pid):
            for pid in _session_members(process.pid):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        process.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), SynthConfig(images=2 * SHARDS, split="val", seed=5, height=64, width=64, shard_size=2))
    return root


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A fresh root for the input and the labels: a local folder, or a prefix in a fresh bucket on moto."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3_bucket')}/store"


def _put(data, where: str, *indices: int) -> list[str]:
    """Copy synth's tar shards `indices` into WHERE/in (as new shards arriving); their URIs."""
    fs, root = fsspec.core.url_to_fs(f"{where}/in")
    fs.makedirs(root, exist_ok=True)
    uris = []
    for i in indices:
        fs.pipe_file(f"{root}/val-{i:05d}.tar", (data / "shards" / f"val-{i:05d}.tar").read_bytes())
        uris.append(fs.unstrip_protocol(f"{root}/val-{i:05d}.tar"))
    return uris


def _job(tmp_path, data, where: str, head: str, lease_seconds: float = 60, files_per_shard: int = 64):
    path = tmp_path / "label.yaml"
    path.write_text(f"""kind: label
input: {where}/in
out: {where}/out
model: segpipe_small
random_weights: true
categories: {data / 'annotations' / 'panoptic_val.json'}
infer: {{batch_size: 1, cpus_per_actor: 0.5, stuff_area: 64, files_per_shard: {files_per_shard}}}
schedule: {{cron: "*/15 * * * *", lease_seconds: {lease_seconds}}}
address: {head}
""")
    return load(str(path))


def tick(job) -> SimpleNamespace:
    """One tick of the job in a process of its own, as cron or a timer runs it: its TickSummary's fields.

    Not in this process: a process that ran a local Ray before (any earlier test) cannot start Ray Data's actors
    on another cluster afterwards (Ray 2.60: "The actor never ran - it was cancelled before it started running")."""
    code = ("import dataclasses, json, sys; from pipeline.jobs import load; from pipeline.jobs.schedule import tick; "
            "summary = tick(load(sys.argv[1])); "
            "print(json.dumps({**dataclasses.asdict(summary), 'exit_code': summary.exit_code}))")
    done = subprocess.run([sys.executable, "-c", code, job.path], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return SimpleNamespace(**json.loads(done.stdout.strip().splitlines()[-1]))


def _json_files(uri: str, inside: str) -> dict[str, dict]:
    fs, root = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache()  # the ticks write from other processes: s3fs's listings here would be stale
    files = sorted(p for p in fs.find(root) if inside in p and p.endswith(".json"))
    return {p: json.loads(data) for p, data in (fs.cat(files) if files else {}).items()}


def _labeled_images(where: str) -> Counter:
    """How often each image was labeled in any batch folder, committed or not (infer's per-shard parts)."""
    return Counter(image["file_name"] for part in _json_files(f"{where}/out/batches", "/parts/").values()
                   for image in part["images"])


def _committed_shards(where: str) -> list[str]:
    return [shard["uri"] for entry in _json_files(f"{where}/out/manifest", "/manifest/").values()
            for shard in entry["shards"]]


ALL_IMAGES = Counter({f"{i:012d}.jpg": 1 for i in range(1, 2 * SHARDS + 1)})


def test_ticks_with_new_shards_between_label_each_once_and_report_a_rewritten_shard(head, data, where, tmp_path):
    job = _job(tmp_path, data, where, head)
    first = _put(data, where, 0, 1, 2)
    one = tick(job)
    assert (one.labeled, one.committed_before, one.images, one.exit_code) == (3, 0, 6, 0)
    second = _put(data, where, 3, 4, 5)
    two = tick(job)
    assert (two.labeled, two.committed_before, two.images, two.exit_code) == (3, 3, 6, 0)
    idle = tick(job)  # nothing new: no batch, no Ray
    assert (idle.labeled, idle.committed_before, idle.batches, idle.exit_code) == (0, 6, [], 0)
    assert _labeled_images(where) == ALL_IMAGES
    assert sorted(_committed_shards(where)) == sorted(first + second)

    fs, path = fsspec.core.url_to_fs(first[0])
    fs.pipe_file(path, (data / "shards" / "val-00005.tar").read_bytes())  # rewritten in place after labeling
    rewritten = tick(job)
    assert rewritten.rewritten == [first[0]] and rewritten.labeled == 0 and rewritten.exit_code == 1
    assert _labeled_images(where) == ALL_IMAGES  # reported, not relabeled


def test_a_tick_killed_midway_is_taken_over_after_its_lease_and_labels_nothing_twice(head, data, where, tmp_path):
    lease_seconds = 4
    job = _job(tmp_path, data, where, head, lease_seconds)
    _put(data, where, *range(SHARDS))
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "schedule", job.path, "--once"],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (parts := _json_files(f"{where}/out/batches", "/parts/")):
        assert process.poll() is None, "the tick ended before it could be killed"
        assert time.monotonic() < deadline, "no shard committed within 240 s"
        time.sleep(0.05)
    while _session_members(process.pid):  # the tick's driver: the cluster's workers are not in its session
        for pid in _session_members(process.pid):
            os.kill(pid, 9)
    process.wait()
    parts = _json_files(f"{where}/out/batches", "/parts/")
    assert 1 <= len(parts) < SHARDS, "the kill must land midway for this test to mean anything"
    fs, _ = fsspec.core.url_to_fs(where)
    fs.invalidate_cache()
    before = {p: fs.info(p).get("ETag", fs.info(p).get("mtime")) for p in parts}

    busy = tick(job)  # the dead tick's lease has not run out: its batch is left alone
    assert (busy.labeled, busy.busy, busy.taken_over) == (0, SHARDS, [])
    time.sleep(lease_seconds + 0.5)
    resumed = tick(job)
    assert len(resumed.taken_over) == 1 and resumed.batches == resumed.taken_over
    assert (resumed.labeled, resumed.resumed, resumed.images) == (SHARDS, len(parts), 2 * SHARDS)
    assert _labeled_images(where) == ALL_IMAGES  # nothing twice, nothing lost
    fs.invalidate_cache()
    assert {p: fs.info(p).get("ETag", fs.info(p).get("mtime")) for p in parts} == before  # committed parts untouched
    assert state(f"{where}/out/leases/batches/{resumed.batches[0]}").record is None  # released


def test_two_ticks_at_once_in_two_processes_never_label_one_shard_twice(head, data, where, tmp_path):
    job = _job(tmp_path, data, where, head)
    _put(data, where, *range(SHARDS))
    command = [sys.executable, "-m", "pipeline", "schedule", job.path, "--once"]
    ticks = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [t.communicate(timeout=300) for t in ticks]
    assert [t.returncode for t in ticks] == [0, 0], outputs
    batches = [entry["shards"] for entry in _json_files(f"{where}/out/manifest", "/manifest/").values()]
    shards = [shard["uri"] for batch in batches for shard in batch]
    assert len(shards) == len(set(shards)) == SHARDS  # the union complete, the batches disjoint
    assert _labeled_images(where) == ALL_IMAGES
    assert sum("shards labeled" in out for out, _ in outputs) == 2


def test_an_expired_lease_of_a_dead_holder_is_taken_over_by_exactly_one_of_many_takers(where):
    folder = f"{where}/leases/one"
    dead = subprocess.run([sys.executable, "-c", "import sys; from pipeline.jobs.leases import acquire, holder; "
                           f"sys.exit(0 if acquire({folder!r}, holder('dead'), 10.0) else 1)"], env=os.environ)
    assert dead.returncode == 0  # took generation 0 and exited without releasing it: a dead holder

    def race(tag: str) -> list:
        won, start = [], threading.Barrier(8)

        def take(i):
            start.wait()
            lease = acquire(folder, holder(f"{tag}-{i}"), 30.0)
            if lease is not None:
                won.append(lease)
        threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return won

    assert state(folder).live and race("early") == []  # the dead holder's lease is still in its term
    while state(folder).live:
        time.sleep(0.1)
    won = race("late")
    assert len(won) == 1 and won[0].generation == 1
    assert held(won[0]) and renew(won[0])
    current = state(folder)
    assert current.generation == 1 and current.record["holder"] == won[0].holder


def test_bad_specs_are_one_line_before_any_work(tmp_path, data):
    runner = CliRunner()
    spec = (f"kind: label\ninput: {data / 'shards'}\nout: {tmp_path / 'out'}\nmodel: segpipe_small\n"
            "random_weights: true\n")
    cases = {
        "bad cron": (spec + "schedule: {cron: '61 * * * *'}\n", ["--once"], "is not a cron expression"),
        "no schedule": (spec, [], "no schedule.cron"),
        "missing input": (spec.replace(str(data / "shards"), str(tmp_path / "nowhere")), ["--once"], "nowhere"),
    }
    for name, (text, options, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.yaml"
        path.write_text(text)
        result = runner.invoke(app, ["schedule", str(path), *options])
        assert result.exit_code == 2, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("segpipe: error: ") and message in lines[0], (name, lines)
        assert not (tmp_path / "out").exists()  # nothing started


def test_the_loop_waits_for_the_cron_time_and_stops_cleanly_on_sigterm(tmp_path, data):
    job = tmp_path / "label.yaml"
    job.write_text(f"kind: label\ninput: {data / 'shards'}\nout: {tmp_path / 'out'}\nmodel: segpipe_small\n"
                   "random_weights: true\nschedule: {cron: '0 0 1 1 *'}\n")  # next tick: New Year
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "schedule", str(job)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stderr.readline()
    assert first.startswith("next tick at ") and "-01-01T00:00:00" in first, first
    process.send_signal(15)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 0 and rest.strip().startswith("stopped (")
    assert not (tmp_path / "out").exists()  # no tick ran


def test_new_images_in_an_image_folder_become_new_shards_labeled_once(head, data, tmp_path):
    """A folder has no stable shards (a new name shifts the later groups): a tick groups only the unclaimed images."""
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    names = sorted(p.name for p in (data / "val").iterdir())
    for name in names[::2]:  # every other image first, so the later ones fall between them in name order
        shutil.copy(data / "val" / name, folder / name)
    job = _job(tmp_path, data, str(tmp_path), head, files_per_shard=4)
    first = tick(job)
    assert (first.labeled, first.images) == (2, 6)  # 4 + 2
    for name in names[1::2]:
        shutil.copy(data / "val" / name, folder / name)
    second = tick(job)
    assert (second.labeled, second.committed_before, second.images) == (2, 2, 6)
    assert _labeled_images(str(tmp_path)) == ALL_IMAGES
    members = [shard["members"] for entry in _json_files(f"{tmp_path}/out/manifest", "/manifest/").values()
               for shard in entry["shards"]]
    assert sorted(m for group in members for m in group) == names and max(map(len, members)) == 4
