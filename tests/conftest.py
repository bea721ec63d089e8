"""Shared fixtures: small synthetic datasets and a real S3 API (moto's server) on loopback."""

import os
import signal
import socket
import time

import pytest

from pipeline.synth import SynthConfig, write_dataset


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A 12-image val split with tar shards; crowds and VOID on every image, so each case occurs."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), SynthConfig(images=12, split="val", seed=7, shard_size=5,
                                         crowd_probability=1.0, void_probability=1.0))
    return root


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode on 127.0.0.1: s3fs talks real HTTP to it, nothing is mocked in-process."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket; the endpoint reaches s3fs the way a user's would (AWS_ENDPOINT_URL_S3)."""
    import uuid

    import fsspec

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    fsspec.filesystem("s3").clear_instance_cache()
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(name)
    fs.clear_instance_cache()
    return name


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry))
    return members


@pytest.fixture(scope="session")
def kill_session():
    """SIGKILL every live process of a session: the driver, Ray's GCS and raylet, and Ray's workers, which
    make process groups of their own (so killpg on the driver's group would leave them running)."""
    def kill(sid: int) -> int:
        killed = 0
        for _ in range(50):  # until none is left: a dying raylet may still have forked a worker
            members = _session_members(sid)
            if not members:
                return killed
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"processes of session {sid} survive SIGKILL: {_session_members(sid)}")
    return kill
