"""Scheduled bulk labeling: ticks that label the shards of a label job's input that no earlier tick committed.

A tick plans, then labels. Planning is one tick at a time (under the lease OUT/leases/plan): list the input,
read the manifest (what earlier ticks committed) and the leases of batches in flight, report committed files
rewritten since, take over batches whose lease expired (a dead tick's), and put the new shards into a new batch
under a lease of its own. Labeling runs in parallel with other ticks: each batch is one `pipeline.infer` run into
OUT/batches/<batch>/ over exactly its shards, so a batch taken over resumes where its dead tick stopped (infer
commits shard by shard, and skips committed shards on a rerun: nothing labeled twice, nothing lost). A batch is
committed by creating OUT/manifest/<batch>.json (create-if-absent: at most once), then its lease is released.

    OUT/manifest/<batch>.json      the commits: the batch's shards, their files' versions, counts, where the labels are
    OUT/batches/<batch>/           batch.json (shards and versions as planned) + the infer outputs (predictions/, ...)
    OUT/leases/plan/, OUT/leases/batches/<batch>/   leases (pipeline.jobs.leases)

Image folders have no stable shards of their own (a new file shifts every later one), so a tick groups the
folder's images that no commit or batch in flight holds into new shards of `files_per_shard`, in name order;
planning one tick at a time is what keeps two ticks from grouping the same new image twice.

A committed file whose size or version (S3 ETag, local mtime) changed is reported on every tick (exit code 1)
and not relabeled: delete its batch's manifest file to have the next tick label that batch's shards afresh.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import orjson

from pipeline.errors import SegpipeError
from pipeline.infer import InferConfig
from pipeline.io.fs import is_hidden, join, parse_json, url_to_fs, write_bytes
from pipeline.io.shards import Shard, list_shards
from pipeline.jobs import Job, check, infer_config
from pipeline.jobs.leases import (Heartbeat, Lease, State, abandon, acquire, check_store, create_exclusive, fresh, held,
                                  holder, release, state)
from pipeline.progress import Progress, quiet

PLAN_LEASE_S = 60.0
"""Term of the planning lease (renewed while a tick plans, which takes seconds): how long a tick killed while
planning holds up the next one."""
PLAN_POLL_S = 0.5


@dataclass(frozen=True)
class Setup:
    """A label job checked and turned into what its ticks need."""

    job: Job
    out: str
    lease_seconds: float
    cron: str | None
    config: InferConfig
    """The `segpipe infer` run over the whole input; each batch replaces its `shards` and `out`."""

    @property
    def files_per_shard(self) -> int:
        return self.config.files_per_shard


@dataclass
class TickSummary:
    """What one tick found and did; printed, and the source of the exit code."""

    tick: str
    shards: int = 0
    """Shards in the input (image folders: as committed, plus the new ones of this tick)."""
    committed_before: int = 0
    """Shards earlier ticks had committed."""
    labeled: int = 0
    """Shards this tick committed: new ones and those of batches it took over."""
    resumed: int = 0
    """Of those, shards a dead tick had labeled already: committed, not labeled again."""
    busy: int = 0
    """Shards in batches that other live ticks hold."""
    images: int = 0
    segments: int = 0
    failed: int = 0
    batches: list[str] = field(default_factory=list)
    """Batches this tick committed."""
    taken_over: list[str] = field(default_factory=list)
    """Of those, batches whose tick died (lease expired or abandoned)."""
    lost: list[str] = field(default_factory=list)
    """Batches whose lease another tick took over while this one worked (this tick committed nothing of them)."""
    rewritten: list[str] = field(default_factory=list)
    """Committed files whose size or version changed since they were labeled: reported, not relabeled."""
    wall_s: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.lost or self.rewritten else 0


def prepare(job: Job, address: str | None = None, loop: bool = False) -> Setup:
    """Check a label job for ticking: one SegpipeError before any work (bad cron, missing input, a store
    without an atomic create-if-absent, a model or checkpoint that does not load)."""
    from croniter import croniter

    if job.kind != "label":
        raise SegpipeError(f"{job.path}: a {job.kind} job; ticks label, so schedule takes label jobs")
    schedule = job.spec.get("schedule") or {}
    cron = schedule.get("cron")
    if cron is None and loop:
        raise SegpipeError(f"{job.path}: no schedule.cron; add a schedule section, or run one tick with --once")
    if cron is not None and not croniter.is_valid(cron):
        raise SegpipeError(f"{job.path}: schedule.cron: {cron!r} is not a cron expression "
                           "(minute hour day month weekday, e.g. '*/15 * * * *')")
    check(job)
    check_store(job.spec["out"])
    config = infer_config(job, address)
    if config.settings.weights is not None:
        from pipeline.models import load_model

        load_model(config.model, config.settings)  # a checkpoint that does not fit fails here, before any lease
    return Setup(job, job.spec["out"].rstrip("/"), float(schedule.get("lease_seconds", 900)), cron, config)


def tick(job: Job, address: str | None = None, progress: Progress = quiet) -> TickSummary:
    """One tick over a label job: label the shards of its input that no earlier tick committed."""
    with _sigterm_interrupts():
        return run_tick(prepare(job, address), progress)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the block runs, as Ctrl-C does: a tick stopped by a service manager
    or `segpipe jobs stop` abandons its leases, so the next tick resumes at once (Python delivers signals to the
    main thread only; elsewhere nothing changes)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_tick(setup: Setup, progress: Progress = quiet) -> TickSummary:
    """One tick of a prepared job (see the module's docstring)."""
    start = time.perf_counter()
    summary = TickSummary(tick=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8])
    who = holder(summary.tick)
    work = _plan(setup, who, summary, progress)
    if work:
        _label(setup, work, summary, progress)
    summary.wall_s = time.perf_counter() - start
    return summary


# --- planning (one tick at a time) -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Batch:
    """A batch a tick holds: its id, its lease, and its shards with their files' versions as planned."""

    id: str
    lease: Lease
    shards: tuple[dict, ...]  # {"kind", "uri", "members", "files": {file uri: [size, version]}}


def _plan(setup: Setup, who: dict, summary: TickSummary, progress: Progress) -> list[_Batch]:
    lock = _wait_for_plan(setup.out, who, progress)
    try:
        with Heartbeat([lock]):
            return _planned(setup, who, summary, progress)
    finally:
        release(lock)


def _wait_for_plan(out: str, who: dict, progress: Progress) -> Lease:
    folder, told = join(out, "leases", "plan"), False
    while True:
        seen = state(folder)
        lease = acquire(folder, who, PLAN_LEASE_S, seen)
        if lease is not None:
            return lease
        if not told and seen.record is not None:
            progress(f"waiting for tick {seen.record['holder']['tick']} to finish planning")
            told = True
        time.sleep(PLAN_POLL_S)


def _planned(setup: Setup, who: dict, summary: TickSummary, progress: Progress) -> list[_Batch]:
    versions = _versions(setup.config.input)
    commits = _commits(setup.out)
    claimed: set[str] = set()  # file URIs that a commit or a batch in flight holds
    for entry in commits.values():
        for shard in entry["shards"]:
            claimed.update(shard["files"])
            summary.committed_before += 1
            summary.rewritten += [uri for uri, version in shard["files"].items()
                                  if uri in versions and versions[uri] != version]
    for uri in summary.rewritten:
        progress(f"rewritten since it was labeled, not relabeled: {uri}")

    work = []
    for batch, seen in _in_flight(setup.out).items():
        folder = join(setup.out, "leases", "batches", batch)
        if batch in commits:  # committed; its tick died before releasing the lease
            release(Lease(folder, seen.generation, who, 0))
            continue
        shards = _batch_shards(setup.out, batch)
        claimed.update(uri for shard in shards for uri in shard["files"])
        if seen.live:
            summary.busy += len(shards)
            continue
        lease = acquire(folder, who, setup.lease_seconds, seen)
        if lease is None:  # another tick took it just now (it planned before the plan lease, or ours expired)
            summary.busy += len(shards)
            continue
        dead = seen.record["holder"] if seen.record else {}
        progress(f"taking over batch {batch} ({len(shards)} shards) of tick {dead.get('tick', '?')} on "
                 f"{dead.get('host', '?')} (pid {dead.get('pid', '?')}), whose lease ran out")
        summary.taken_over.append(batch)
        work.append(_Batch(batch, lease, tuple(shards)))

    new = _new_shards(setup, versions, claimed)
    summary.shards = summary.committed_before + summary.busy + sum(len(b.shards) for b in work) + len(new)
    if new:
        batch = summary.tick
        # batch.json first: a lease always finds its batch's shards (a batch without a lease is no one's)
        write_bytes(join(setup.out, "batches", batch, "batch.json"),
                    orjson.dumps({"batch": batch, "tick": summary.tick, "shards": new}))
        lease = acquire(join(setup.out, "leases", "batches", batch), who, setup.lease_seconds)
        assert lease is not None, "a new batch's lease is free"
        progress(f"{len(new)} new shards in batch {batch}")
        work.append(_Batch(batch, lease, tuple(new)))
    elif not work:
        progress(f"nothing new: {summary.committed_before} shards committed, {summary.busy} in other ticks' hands")
    return work


def _versions(uri: str) -> dict[str, list]:
    """Every file under `uri` (a folder, a file or a glob) -> [size, version]: S3's ETag, else the mtime."""
    fs, path = fresh(uri)
    if any(c in path for c in "*?["):
        found = fs.glob(path, detail=True)
    elif fs.isfile(path):
        found = {path: fs.info(path)}
    elif fs.isdir(path):
        found = fs.find(path, detail=True)
    else:
        raise SegpipeError(f"{uri}: no such file or folder")
    return {fs.unstrip_protocol(p): [info["size"], str(info.get("ETag") or info.get("mtime") or info.get("LastModified"))]
            for p, info in found.items() if info.get("type") == "file"}


def _new_shards(setup: Setup, versions: dict[str, list], claimed: set[str]) -> list[dict]:
    """The input's shards no commit or batch in flight holds; an image folder's unclaimed images grouped anew."""
    if not set(versions) - claimed:
        return []
    new = []
    for shard in list_shards(setup.config.input, files_per_shard=sys.maxsize):  # folders whole: grouped below
        if shard.kind != "folder":
            if shard.uri in versions and shard.uri not in claimed:  # else: it appeared after the listing
                new.append(_described(shard, [shard.uri], versions))
            continue
        names = [name for name in shard.members
                 if join(shard.uri, name) in versions and join(shard.uri, name) not in claimed]
        for i in range(0, len(names), setup.files_per_shard):
            members = tuple(names[i:i + setup.files_per_shard])
            new.append(_described(Shard("folder", shard.uri, members), [join(shard.uri, m) for m in members], versions))
    return new


def _described(shard: Shard, files: list[str], versions: dict[str, list]) -> dict:
    return {**asdict(shard), "files": {uri: versions[uri] for uri in files}}


def _in_flight(out: str) -> dict[str, State]:
    """Batch id -> its lease's state, for every batch with a lease file (taken, not yet released)."""
    fs, path = fresh(join(out, "leases", "batches"))
    batches = sorted({p[len(path):].strip("/").split("/", 1)[0] for p in fs.find(path)})
    return {batch: state(join(out, "leases", "batches", batch)) for batch in batches}


def _batch_shards(out: str, batch: str) -> list[dict]:
    uri = join(out, "batches", batch, "batch.json")
    fs, path = url_to_fs(uri)
    try:
        return parse_json(fs.cat_file(path), uri)["shards"]
    except FileNotFoundError:  # removed by hand: the lease guards nothing
        return []


def _commits(out: str) -> dict[str, dict]:
    """The manifest: batch id -> its commit, the files fetched concurrently (s3fs)."""
    fs, path = fresh(join(out, "manifest"))
    files = [p for p in fs.find(path) if p.endswith(".json") and not is_hidden(p[len(path):])]
    contents = fs.cat(files) if files else {}
    return {p.rsplit("/", 1)[-1][:-len(".json")]: parse_json(data, fs.unstrip_protocol(p)) for p, data in contents.items()}


# --- labeling (ticks in parallel) ---------------------------------------------------------------------------------

def _label(setup: Setup, work: list[_Batch], summary: TickSummary, progress: Progress) -> None:
    """Label each held batch (resuming what a dead tick committed), commit it, release its lease. A tick stopped
    midway (an error, Ctrl-C, SIGTERM) abandons the leases it still holds, so the next tick resumes at once."""
    import ray

    from pipeline import infer
    from pipeline.cluster import connect

    unfinished, started = list(work), False
    try:
        started = connect(setup.config.address)  # one Ray for the whole tick, however many batches
        with Heartbeat([batch.lease for batch in work]) as heartbeat:
            for batch in work:
                shards = tuple(Shard(s["kind"], s["uri"], tuple(s["members"])) for s in batch.shards)
                result = None
                if batch.lease.folder not in heartbeat.lost and held(batch.lease):
                    result = infer.run(replace(setup.config, out=join(setup.out, "batches", batch.id), shards=shards),
                                       progress)
                unfinished.remove(batch)
                heartbeat.drop(batch.lease)
                if result is None or batch.lease.folder in heartbeat.lost or not _commit(setup, batch, result, summary):
                    summary.lost.append(batch.id)
                    progress(f"batch {batch.id}: another tick took its lease over (it held it past its term); "
                             "that tick commits it")
                    continue
                release(batch.lease)
    finally:
        for batch in unfinished:
            try:
                abandon(batch.lease)
            except OSError:  # unreachable store: the lease runs out by itself
                pass
        if started:
            ray.shutdown()


def _commit(setup: Setup, batch: _Batch, result, summary: TickSummary) -> bool:
    """Create the batch's manifest entry (at most once, whoever finishes it); False if another tick did."""
    entry = {"batch": batch.id, "tick": summary.tick, "holder": batch.lease.holder,
             "committed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "labels": join(setup.out, "batches", batch.id), "images": result.images, "segments": result.segments,
             "failed": result.failed, "resumed_shards": result.shards_resumed, "shards": list(batch.shards)}
    if not create_exclusive(join(setup.out, "manifest", f"{batch.id}.json"), orjson.dumps(entry)):
        return False
    summary.batches.append(batch.id)
    summary.labeled += len(batch.shards)
    summary.resumed += result.shards_resumed
    summary.images += result.images
    summary.segments += result.segments
    summary.failed += result.failed
    return True


def describe(summary: TickSummary) -> str:
    """One line for a tick."""
    line = (f"tick {summary.tick}: {summary.labeled} shards labeled ({summary.resumed} committed already by a dead "
            f"tick, not relabeled), {summary.images} images, {summary.segments} segments, {summary.failed} failed; "
            f"{summary.committed_before} shards committed before, {summary.busy} held by other ticks "
            f"({summary.wall_s:.1f} s)")
    if summary.taken_over:
        line += f"; took over {', '.join(summary.taken_over)}"
    if summary.lost:
        line += f"; lost {', '.join(summary.lost)}"
    if summary.rewritten:
        line += f"; {len(summary.rewritten)} committed files rewritten since labeled (not relabeled)"
    return line


# --- the loop ---------------------------------------------------------------------------------------------------

def serve(job: Job, address: str | None = None, progress: Progress = quiet,
          report: Callable[[TickSummary], None] = lambda summary: None) -> int:
    """Tick on the job's cron times (the host's local time) until Ctrl-C or SIGTERM; returns the exit code:
    0 stopped between ticks, 130 stopped during one (its leases abandoned: the next tick resumes it).
    A tick that fails (the store unreachable, say) is one line; the next cron time tries again."""
    from datetime import datetime

    from croniter import croniter

    setup = prepare(job, address, loop=True)
    ticking = False
    try:
        with _sigterm_interrupts():
            while True:
                due = croniter(setup.cron, datetime.now().astimezone()).get_next(datetime)  # overruns skip, never pile up
                progress(f"next tick at {due.isoformat(timespec='seconds')}")
                time.sleep(max(0.0, due.timestamp() - time.time()))
                ticking = True
                try:
                    report(run_tick(setup, progress))
                except (SegpipeError, OSError) as error:
                    progress(f"tick failed: {error}")
                ticking = False
    except KeyboardInterrupt:
        progress("stopped during a tick; the next tick resumes its work" if ticking else "stopped")
        return 130 if ticking else 0
