"""segpipe submit and segpipe jobs against a real `ray start --head` on loopback, started (and killed) by these tests.

The head runs with a `pipeline` package on its PYTHONPATH that fails on import, so a job that imported anything but
the package `submit` shipped would fail; and with Ray's token authentication on, with a token of its own.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import SegpipeError
from pipeline.jobs import submit as submission
from pipeline.synth import SynthConfig, write_dataset

runner = CliRunner()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, kill_session):
    """The job server's address. Every port is chosen here (other Ray clusters may run on this machine), and only
    this head's session is killed at the end: `ray stop` would stop every Ray on the machine."""
    root = tmp_path_factory.mktemp("cluster")
    poison = root / "installed" / "pipeline"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text('raise ImportError("the cluster imported an installed segpipe, not the shipped one")\n')
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(PYTHONPATH=str(poison.parent), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    log = open(root / "head.log", "w")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=2",
         "--disable-usage-stats", f"--temp-dir={temp_dir}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_TOKEN_PATH", str(token))  # this side finds the token where Ray's tools would
        patch.delenv("RAY_ADDRESS", raising=False)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    submission.connect(address)
                    break
                except SegpipeError:
                    if head.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"the Ray head did not come up: {(root / 'head.log').read_text()[-2000:]}")
                    time.sleep(1)
            yield address
        finally:
            kill_session(head.pid)
            log.close()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def label_spec(tmp_path_factory):
    """A label job over 120 synthetic images in 30 shards: long enough to be stopped between two commits."""
    root = tmp_path_factory.mktemp("label")
    write_dataset(str(root / "data"), SynthConfig(images=120, split="val", seed=3, height=64, width=64, workers=1))
    spec = root / "label.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "label", "input": "data/val", "out": "labels", "model": "segpipe_small", "random_weights": True,
        "categories": "data/annotations/panoptic_val.json", "infer": {"batch_size": 4, "files_per_shard": 4}}))
    return spec


class _DroppingClient:
    """A real client whose log stream ends after its first chunk, as a dropped connection ends it (a network drop
    cannot be made to happen on loopback); everything else goes to the real job server."""

    def __init__(self, client):
        self._client = client
        self.streams = 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def tail_job_logs(self, job):
        self.streams += 1
        async for chunk in self._client.tail_job_logs(job):
            yield chunk
            return


def _wait_for(check, what: str, timeout_s: float = 240.0, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}"
        time.sleep(every_s)


def test_a_bad_spec_is_one_line_before_the_cluster_is_contacted(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("kind: label\ninput: images\nout: labels\nmodel: segpipe_small\nrandom_weights: true\nbatchsize: 4\n")
    result = runner.invoke(app, ["submit", str(spec), "--address", "http://127.0.0.1:9"])  # nothing listens there
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "batchsize" in result.stderr and str(spec) in result.stderr
    assert "127.0.0.1:9" not in result.stderr  # the spec was refused, not the address


def test_an_unreachable_job_server_is_one_line_naming_it(label_spec):
    (port,) = _free_ports(1)
    result = runner.invoke(app, ["submit", str(label_spec), "--address", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"cannot reach Ray's job server at http://127.0.0.1:{port}" in result.stderr


def test_a_window_is_a_submission_of_its_own():
    digest = "0123456789abcdef" * 4
    assert submission.submission_id(digest, "label") == "segpipe-label-0123456789abcdef"
    assert submission.submission_id(digest, "label", "20261127T1415") == "segpipe-label-0123456789abcdef-20261127T1415"
    with pytest.raises(SegpipeError, match="--window 'a b'"):
        submission.submission_id(digest, "label", "a b")


def test_the_package_holds_the_code_its_schemas_and_the_resolved_spec(tmp_path):
    import pipeline

    runtime_env = submission.package({"kind": "label", "out": "/abs/labels", "infer": {"pair": (1, 2)}}, tmp_path)
    shipped, source = Path(runtime_env["py_modules"][0]), Path(pipeline.__file__).parent

    def files(root: Path) -> set[str]:  # links followed, as Ray's packaging follows them
        return {os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root, followlinks=True)
                for name in names if "__pycache__" not in folder}

    assert shipped.name == "pipeline" and files(shipped) == files(source) and not list(shipped.rglob("__pycache__"))
    # pipeline/schemas is a link to the repository's schemas/: shipped as files, so the cluster checks the same
    assert (shipped / "schemas" / "predictions.json").read_bytes() == (source / "schemas" / "predictions.json").read_bytes()
    assert os.listdir(runtime_env["working_dir"]) == [submission.SPEC_NAME]
    assert yaml.safe_load((Path(runtime_env["working_dir"]) / submission.SPEC_NAME).read_text()) == \
        {"kind": "label", "out": "/abs/labels", "infer": {"pair": [1, 2]}}


def test_an_unknown_job_is_one_line(cluster):
    for command in (["jobs", "status", "nope"], ["jobs", "logs", "nope"], ["jobs", "logs", "nope", "--follow"],
                    ["jobs", "stop", "nope"]):
        result = runner.invoke(app, [*command, "--address", cluster])
        assert result.exit_code == 2, command
        assert result.stderr == f"segpipe: error: job nope: no such job at {cluster}\n", command


def test_a_stopped_job_resumes_when_submitted_again_and_a_done_one_is_attached(cluster, label_spec):
    from pipeline import jobs

    job = jobs.load(str(label_spec))
    out = Path(job.spec["out"])
    base = submission.submission_id(job.digest, "label")

    first = runner.invoke(app, ["submit", str(label_spec), "--address", cluster])
    assert first.exit_code == 0 and first.stdout == f"submitted {base} (PENDING) at {cluster}\n"
    _wait_for(lambda: list(out.glob("batches/*/parts/part-*.json")), "the first shard's commit")
    stopped = runner.invoke(app, ["jobs", "stop", base, "--wait", "--address", cluster])
    assert stopped.exit_code == 0 and stopped.stdout.startswith(f"{base}: STOPPED")
    committed = len(list(out.glob("batches/*/parts/part-*.json")))
    assert 1 <= committed < 30  # stopped between two commits
    status = runner.invoke(app, ["jobs", "status", base, "--json", "--address", cluster])
    assert status.exit_code == 1 and json.loads(status.stdout)["status"] == "STOPPED"

    # Ray refuses a used submission id: the stopped attempt's successor is -retry1, and it resumes.
    again = runner.invoke(app, ["submit", str(label_spec), "--address", cluster])
    assert again.exit_code == 0 and again.stdout == f"submitted {base}-retry1 (PENDING) at {cluster}\n"
    client = _DroppingClient(submission.connect(cluster))
    followed = []
    assert submission.follow(client, f"{base}-retry1", followed.append) == "SUCCEEDED"
    logs = submission.logs(f"{base}-retry1", cluster)
    assert "".join(followed) == logs  # every line once, though each stream ended after one chunk
    assert client.streams >= 2 and "120 images" in logs

    [batch] = (out / "batches").iterdir()  # a label job is a schedule tick: the retry took the stopped one's batch over
    summary = json.loads((batch / "summary.json").read_text())
    assert summary["shards_resumed"] == committed and summary["images"] == 120 and summary["failed"] == 0
    predictions = pq.read_table(batch / "predictions", columns=["image_id"])
    assert len(set(predictions["image_id"].to_pylist())) == len(json.loads((batch / "panoptic_pred.json").read_text())["images"]) == 120

    # The same spec again: the done submission is the work; nothing new starts.
    count = len(submission.list_jobs(cluster))
    attached = runner.invoke(app, ["submit", str(label_spec), "--address", cluster, "--follow"])
    assert attached.exit_code == 0
    assert attached.stdout.startswith(f"attached to {base}-retry1 (SUCCEEDED) at {cluster}\n")
    assert attached.stdout.endswith(f"{base}-retry1: SUCCEEDED\n") and "120 images" in attached.stdout
    assert len(submission.list_jobs(cluster)) == count == 2

    status = runner.invoke(app, ["jobs", "status", f"{base}-retry1", "--json", "--address", cluster])
    described = json.loads(status.stdout)
    assert status.exit_code == 0 and described["status"] == "SUCCEEDED"
    assert (described["kind"], described["digest"], described["entrypoint"]) == ("label", job.digest, submission.ENTRYPOINT)
    assert described["metadata"]["segpipe_spec"] == str(label_spec) and described["end_time"] >= described["start_time"]
    listed = runner.invoke(app, ["jobs", "list", "--json", "--address", cluster])
    assert listed.exit_code == 0
    assert [(j["submission_id"], j["status"]) for j in json.loads(listed.stdout)] == [(base, "STOPPED"), (f"{base}-retry1", "SUCCEEDED")]
    table = runner.invoke(app, ["jobs", "list", "--address", cluster])
    assert table.exit_code == 0 and f"{base}-retry1" in table.stdout and "SUCCEEDED" in table.stdout
    printed = runner.invoke(app, ["jobs", "logs", f"{base}-retry1", "--address", cluster])
    assert printed.exit_code == 0 and printed.stdout == logs
    failed = runner.invoke(app, ["jobs", "logs", base, "--follow", "--address", cluster])
    assert failed.exit_code == 1  # a stopped job's logs end in exit 1


def test_a_server_that_asks_for_a_token_is_one_line_without_the_right_one(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    result = runner.invoke(app, ["jobs", "list", "--address", cluster])
    assert result.exit_code == 2
    assert result.stderr == (f"segpipe: error: Ray's job server at {cluster} asks for a token; none in RAY_AUTH_TOKEN, "
                             "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    result = runner.invoke(app, ["jobs", "list", "--address", cluster])
    assert result.exit_code == 2 and result.stderr.startswith(f"segpipe: error: Ray's job server at {cluster} refused the token")


def test_a_failed_job_is_submitted_again_as_the_next_retry(cluster, tmp_path):
    from pipeline import jobs

    spec = tmp_path / "missing.yaml"
    spec.write_text(yaml.safe_dump({"kind": "label", "input": "nowhere", "out": "labels", "model": "segpipe_small",
                                    "random_weights": True}))
    base = submission.submission_id(jobs.load(str(spec)).digest, "label")
    for attempt in (base, f"{base}-retry1"):
        result = runner.invoke(app, ["submit", str(spec), "--address", cluster, "--follow"])
        assert result.exit_code == 1  # the job failed: its one line is in its logs, and it ends FAILED
        assert result.stdout.startswith(f"submitted {attempt} (PENDING) at {cluster}\n")
        assert f"job.yaml: input: {tmp_path / 'nowhere'}: no such file or folder" in result.stdout
        assert result.stdout.endswith(f"{attempt}: FAILED\n")
    listed = [job["submission_id"] for job in submission.list_jobs(cluster) if job["digest"] == jobs.load(str(spec)).digest]
    assert sorted(listed) == [base, f"{base}-retry1"]
