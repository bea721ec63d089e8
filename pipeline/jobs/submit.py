"""Submitting a job spec to a Ray cluster through Ray's Job Submission API, and watching what was submitted.

    segpipe submit JOB.yaml --address http://HEAD:8265
      -> the spec, loaded and checked here (a bad spec fails before the cluster is contacted), written with its
         paths resolved as the job's working_dir; a copy of the `pipeline` package as its py_modules
      -> submission id `segpipe-<kind>-<16 hex of the spec's digest>[-<window>]`: the same spec (in the same
         window) is the same submission, so a second submit attaches to the first instead of running it twice
      -> on the cluster: `python -m pipeline run job.yaml --address auto`, importing the shipped package

The cluster is assumed to have segpipe's dependencies (torch, Ray, pyarrow, ...) in the `python` its jobs run;
only segpipe's own code travels. Ray refuses a submission id it has seen, so a spec whose last submission
FAILED or was STOPPED is resubmitted as `<id>-retry<N>` (N one more than the last attempt's); it resumes,
since every stage skips the work its outputs already hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from pipeline.errors import SegpipeError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SPEC_NAME = "job.yaml"
ENTRYPOINT = f"python -m pipeline run {SPEC_NAME} --address auto"
PACKAGE_LIMIT = 100 << 20
"""What the job server takes as a package (it refuses larger uploads)."""
ATTACHABLE = ("PENDING", "RUNNING", "SUCCEEDED")
"""A submission in one of these is the work, done or under way: submitting again attaches to it."""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_S = 1.0


@dataclass(frozen=True)
class Submission:
    """What `submit` did: the submission it made or attached to, and that submission's status then."""

    submission_id: str
    status: str
    attached: bool
    address: str


def submission_id(digest: str, kind: str, window: str | None = None) -> str:
    """The id of a spec's work (and of one schedule window's): equal specs, equal ids."""
    if window is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", window):
        raise SegpipeError(f"--window {window!r}: use letters, digits, '_', '-' and '.' only (e.g. 20261127T1415)")
    return f"segpipe-{kind}-{digest[:16]}" + (f"-{window}" if window else "")


def _attempt(found: str, base: str) -> int | None:
    """0 for the first submission of `base`, N for `base-retryN`, None for another job's id."""
    if found == base:
        return 0
    match = re.fullmatch(re.escape(base) + r"-retry(\d+)", found)
    return int(match[1]) if match else None


def address_of(address: str | None) -> str:
    """The job server: the one given, else RAY_ADDRESS, else a head node on this machine."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


@contextlib.contextmanager
def _answers(address: str, job: str | None = None) -> Iterator[None]:
    """The job server's failures as one line: an unknown job, or a server that does not answer."""
    import requests

    try:
        yield
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        raise SegpipeError(f"cannot reach Ray's job server at {address} (is the cluster up, with its dashboard?)") from None
    except RuntimeError as error:
        if job is not None and "status code 404" in str(error):
            raise SegpipeError(f"job {job}: no such job at {address}") from None
        last = str(error).strip().splitlines()[-1]  # a server error's text can be a whole traceback: its end says what
        raise SegpipeError(f"Ray's job server at {address}: {last.strip()}") from None


def _token() -> str | None:
    """The token Ray's own tools would send: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def connect(address: str | None = None):
    """A JobSubmissionClient for `address` (see `address_of`), or one line naming the address that did not answer.

    A cluster that asks for a token (Ray's token authentication, on by default where `ray start` finds one) gets the
    token Ray's tools would use, in the header Ray reads; Ray's client sends it only with RAY_AUTH_MODE=token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address_of(address)
    # "Creating a file package ...", "Uploading package ...": Ray's INFO lines are not for the user's terminal
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray lets RAY_ADDRESS override the address it is given; here an address given wins.
    hidden = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        with _answers(address):
            try:
                return JobSubmissionClient(address)
            except AuthenticationError:
                token = _token()
                if token is None:
                    raise SegpipeError(f"Ray's job server at {address} asks for a token; none in RAY_AUTH_TOKEN, "
                                       "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token") from None
            try:
                return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
            except AuthenticationError:
                raise SegpipeError(f"Ray's job server at {address} refused the token (RAY_AUTH_TOKEN, "
                                   "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)") from None
    finally:
        os.environ.update(hidden)


def package(spec: dict, folder: Path) -> dict:
    """The job's runtime_env: a copy of the `pipeline` package as a Python module (links followed: its schemas come
    along) and the resolved spec as the working_dir; refused when the package is larger than the job server takes.

    The package travels apart from the spec so that one version of the code is one upload, unpacked once per node
    and shared by every job: numba compiles the matcher's kernels on the first import of a fresh copy (about 20
    CPU-seconds) and caches them beside it, where the next job finds them."""
    import pipeline

    source = Path(pipeline.__file__).parent
    shutil.copytree(source, folder / "code" / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    size = sum(f.stat().st_size for f in (folder / "code").rglob("*") if f.is_file())
    if size >= PACKAGE_LIMIT:
        raise SegpipeError(f"{source}: {size / 2**20:.0f} MiB to ship, over the {PACKAGE_LIMIT >> 20} MiB the job "
                           "server takes; move data out of the package folder")
    (folder / "spec").mkdir()
    (folder / "spec" / SPEC_NAME).write_text(yaml.safe_dump(json.loads(json.dumps(spec)), sort_keys=False))  # tuples as lists
    return {"py_modules": [str(folder / "code" / "pipeline")], "working_dir": str(folder / "spec")}


def submit(job, address: str | None = None, window: str | None = None) -> Submission:
    """Submit a loaded job (pipeline.jobs.load), or attach to its submission when one is pending, running or done."""
    base = submission_id(job.digest, job.kind, window)
    client, address = connect(address), address_of(address)
    with _answers(address):
        attempts = sorted((n, d.submission_id, str(d.status)) for d in client.list_jobs()
                          if d.submission_id and (n := _attempt(d.submission_id, base)) is not None)
    if attempts and attempts[-1][2] in ATTACHABLE:
        return Submission(attempts[-1][1], attempts[-1][2], True, address)
    chosen = f"{base}-retry{attempts[-1][0] + 1}" if attempts else base
    metadata = {"segpipe_kind": job.kind, "segpipe_digest": job.digest, "segpipe_spec": job.path if "://" in job.path else str(Path(job.path).resolve()),
                **({"segpipe_window": window} if window else {})}
    with tempfile.TemporaryDirectory(prefix="segpipe-submit-") as folder:
        runtime_env = package({"kind": job.kind, **job.spec}, Path(folder))
        with _answers(address):
            try:
                client.submit_job(entrypoint=ENTRYPOINT, submission_id=chosen, metadata=metadata, runtime_env=runtime_env)
            except RuntimeError as error:
                if "already exists" not in str(error):
                    raise
                # another submit of the same spec got there first: that one is the work
                return Submission(chosen, str(client.get_job_status(chosen)), True, address)
    return Submission(chosen, "PENDING", False, address)


def _time(milliseconds: int | None) -> str | None:
    if milliseconds is None:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, timezone.utc).isoformat(timespec="seconds")


def describe(details) -> dict:
    """A job as plain JSON: id, status, entrypoint, times (UTC, ISO 8601), message, metadata (segpipe's kind ...)."""
    metadata = details.metadata or {}
    return {"submission_id": details.submission_id, "status": str(details.status), "kind": metadata.get("segpipe_kind"),
            "digest": metadata.get("segpipe_digest"), "entrypoint": details.entrypoint,
            "start_time": _time(details.start_time), "end_time": _time(details.end_time),
            "message": details.message, "metadata": metadata}


def list_jobs(address: str | None = None, everything: bool = False) -> list[dict]:
    """The cluster's submitted segpipe jobs (`everything`: all its submitted jobs), oldest first."""
    client = connect(address)
    with _answers(address_of(address)):
        found = client.list_jobs()
    jobs = [describe(d) for d in found if d.submission_id and (everything or (d.metadata or {}).get("segpipe_kind"))]
    return sorted(jobs, key=lambda job: (job["start_time"] or "", job["submission_id"]))


def status(job: str, address: str | None = None) -> dict:
    """One submitted job, as `describe` gives it."""
    client = connect(address)
    with _answers(address_of(address), job):
        return describe(client.get_job_info(job))


def logs(job: str, address: str | None = None) -> str:
    """A job's logs so far."""
    client = connect(address)
    with _answers(address_of(address), job):
        return client.get_job_logs(job)


def follow(client, job: str, echo: Callable[[str], None]) -> str:
    """Echo a job's logs as they come until it ends; its final status. The stream is not trusted to end with the
    job: when it ends (or breaks) while the job still runs, it is reopened, skipping what was already echoed, and
    once the job has ended, whatever the stream had not delivered is read from the stored logs."""
    import aiohttp

    address = client.get_address()
    printed = 0

    async def tail() -> None:
        nonlocal printed
        seen = 0  # every stream starts from the beginning of the job's logs
        async for chunk in client.tail_job_logs(job):
            if seen + len(chunk) > printed:
                echo(chunk[printed - seen:])
                printed = seen + len(chunk)
            seen += len(chunk)

    with _answers(address, job):
        client.get_job_info(job)  # an unknown id is one line, not a failed stream
        while True:
            with contextlib.suppress(RuntimeError, OSError, aiohttp.ClientError):  # a broken stream: the status below decides
                asyncio.run(tail())
            current = str(client.get_job_status(job))
            if current in TERMINAL:
                break
            time.sleep(POLL_S)
        rest = client.get_job_logs(job)[printed:]
    if rest:
        echo(rest)
    return current


def stop(job: str, address: str | None = None, wait: bool = False, timeout_s: float = 120.0) -> dict:
    """Ask Ray to stop a job (its driver is sent SIGTERM, then killed); with `wait`, until it has ended. Outputs
    stay resumable: every stage commits whole shards, so a resubmit skips what was committed."""
    client = connect(address)
    with _answers(address_of(address), job):
        client.stop_job(job)
        deadline = time.monotonic() + timeout_s
        while wait and str(client.get_job_status(job)) not in TERMINAL:
            if time.monotonic() > deadline:
                raise SegpipeError(f"job {job}: still not stopped after {timeout_s:.0f} s")
            time.sleep(POLL_S)
        return describe(client.get_job_info(job))
