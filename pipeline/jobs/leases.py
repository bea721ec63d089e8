"""Leases that expire if their holder dies, on stores with an atomic create-if-absent (local files, S3).

A lease is a folder of generation files, `<folder>/0000000000.json`, `0000000001.json`, ...: the highest
generation is the lease's current state (its holder and when it expires). To take a lease that is free,
expired or abandoned, a taker creates the next generation with an atomic create-if-absent, so of two
takers who saw the same state only one wins. What each store gives:

- local files: a complete temporary file hard-linked to the generation's name; link(2) fails if the name
  exists (also on NFS, where O_EXCL once did not hold), and readers never see a half-written record;
- S3: PutObject with `If-None-Match: *` (s3fs's `pipe_file(mode="create")`), which S3 has honoured since
  August 2024 (moto's server too); a second writer gets 412 Precondition Failed. Listings are strongly
  consistent since December 2020, which the check after taking relies on.

Expiry compares wall clocks: hosts that share leases need clocks in step (NTP) to well within a lease term.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import orjson
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import SegpipeError
from pipeline.io.fs import atomic_write, join, parse_json, url_to_fs

_DIGITS = 10


def check_store(uri: str) -> None:
    """A SegpipeError unless `uri` is on a store whose atomic create-if-absent segpipe relies on."""
    fs, _ = url_to_fs(uri)
    if not isinstance(fs, LocalFileSystem) and "s3" not in _protocols(fs):
        raise SegpipeError(f"{uri}: leases need an atomic create-if-absent, which segpipe relies on for "
                           "local files and s3:// only")


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def fresh(uri: str):
    """`url_to_fs(uri)` with the filesystem's cached listings of `uri` dropped: other processes write there,
    and s3fs would otherwise answer listings from what it saw before."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)
    return fs, path


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write `uri` whole if it does not exist; False (and nothing written) if it does."""
    check_store(uri)
    fs, path = url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        parent, name = os.path.split(path)
        os.makedirs(parent, exist_ok=True)
        temporary = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
        with open(temporary, "wb") as f:
            f.write(data)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        finally:
            os.remove(temporary)
        return True
    if not data:
        raise ValueError("s3fs writes an empty object without the If-None-Match condition")
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def holder(tick: str) -> dict:
    """Who holds a lease: for people reading the lease files, and for the log."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "tick": tick}


@dataclass(frozen=True)
class Lease:
    """Generation `generation` of the lease at `folder`, held by `holder` for `seconds` at a time."""

    folder: str
    generation: int
    holder: dict
    seconds: float

    @property
    def uri(self) -> str:
        return join(self.folder, f"{self.generation:0{_DIGITS}d}.json")

    def record(self, expires: float | None = None) -> bytes:
        expires = time.time() + self.seconds if expires is None else expires
        return orjson.dumps({"holder": self.holder, "expires": expires,
                             "expires_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))})


@dataclass(frozen=True)
class State:
    """A lease's current generation and record (None: free, never taken or released)."""

    generation: int = -1
    record: dict | None = None

    @property
    def live(self) -> bool:
        return self.record is not None and self.record["expires"] > time.time()


def state(folder: str) -> State:
    """Read the lease at `folder`."""
    generations = _generations(folder)
    if not generations:
        return State()
    uri = join(folder, f"{generations[-1]:0{_DIGITS}d}.json")
    fs, path = url_to_fs(uri)
    try:
        return State(generations[-1], parse_json(fs.cat_file(path), uri))
    except FileNotFoundError:  # released between the listing and the read
        return State(generations[-1])


def _generations(folder: str) -> list[int]:
    fs, path = fresh(folder)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def acquire(folder: str, who: dict, seconds: float, seen: State | None = None) -> Lease | None:
    """Take the lease at `folder` if it is free, expired or abandoned; None if someone holds it or wins it.

    `seen`: the state the caller read (and decided on) already; read afresh when None."""
    seen = state(folder) if seen is None else seen
    if seen.live:
        return None
    lease = Lease(folder, seen.generation + 1, who, seconds)
    if not create_exclusive(lease.uri, lease.record()):
        return None
    # A taker with a stale view (older generations deleted since) may create a generation below the
    # current one: it has lost, and the check holds because listings are consistent after writes.
    fs, _ = url_to_fs(folder)
    generations = _generations(folder)
    if generations[-1] != lease.generation:
        _remove(fs, lease.uri)
        return None
    for generation in generations[:-1]:  # superseded; keeps the folder at one file
        _remove(fs, join(folder, f"{generation:0{_DIGITS}d}.json"))
    return lease


def held(lease: Lease) -> bool:
    """Whether `lease` is still the current generation (nobody took it over after it expired)."""
    generations = _generations(lease.folder)
    return bool(generations) and generations[-1] == lease.generation


def renew(lease: Lease) -> bool:
    """Push the expiry one term ahead; False if the lease was taken over (then nothing is written)."""
    if not held(lease):
        return False
    with atomic_write(lease.uri) as f:
        f.write(lease.record())
    return True


def release(lease: Lease) -> None:
    """Give the lease up: the next taker starts a new generation at once."""
    fs, path = url_to_fs(lease.uri)
    _remove(fs, lease.uri)
    if isinstance(fs, LocalFileSystem):
        try:
            os.rmdir(os.path.dirname(path))
        except OSError:  # not empty: a later generation, or a taker's temporary
            pass


def abandon(lease: Lease) -> None:
    """Mark the lease expired now (work stopped, unfinished): the next tick takes it over without waiting."""
    if held(lease):
        with atomic_write(lease.uri) as f:
            f.write(lease.record(expires=time.time()))


def _remove(fs, uri: str) -> None:
    try:
        fs.rm(url_to_fs(uri)[1])
    except FileNotFoundError:
        pass


@dataclass
class Heartbeat:
    """Renews `leases` every third of their term on a thread while work runs; notes the ones lost."""

    leases: list[Lease]
    lost: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._beat, name="segpipe-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def drop(self, lease: Lease) -> None:
        """Stop renewing `lease` (before releasing it: a renewal racing the release would bring it back)."""
        with self._lock:
            self.leases.remove(lease)

    def _beat(self) -> None:
        interval = min(lease.seconds for lease in self.leases) / 3 if self.leases else 60
        while not self._stop.wait(interval):
            with self._lock:
                for lease in self.leases:
                    if lease.folder in self.lost:
                        continue
                    try:
                        if not renew(lease):
                            self.lost.add(lease.folder)
                    except OSError:  # the store hiccupped: the next beat tries again, well within the term
                        pass

