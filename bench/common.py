"""Shared helpers for the benchmarks: which server, a multi-process runner, result tables.

A benchmark here measures a figure of depeche-nb once per driver (psycopg 3
and psycopg2, `--drivers`) against one plain psycopg2 baseline on the same
server in the same run, and prints the ratios. The helpers are deliberately
small:

* `resolve_server(dsn)`: `--dsn`, else `DEPECHE_NB_DSN`, else the embedded
  server `depeche_nb.connect()` would use, whichever driver its URL names;
  gives a SQLAlchemy URL per driver for our side (`Server.url_for`,
  `Server.engine`) and a libpq DSN for the psycopg2 baseline.
* `add_drivers_option(parser)`: the `--drivers` option (default: both).
* `run_in_processes(factory, config, processes, duration)`: runs a step
  function in N *processes* (spawn context, so each starts clean and the GIL
  of one does not throttle the others) for a fixed time and sums the counts.
* `print_table(rows)`: per figure, ours per driver, the baseline, a ratio per
  driver, the first driver against the second, and the target.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import multiprocessing
import multiprocessing.synchronize
import os
import platform
import queue
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
import pydantic
import sqlalchemy as sa

from depeche_nb.postgres.connection import DSN_ENV, normalize_dsn
from depeche_nb.postgres.driver import DRIVERS, check_driver, default_driver
from depeche_nb.postgres.embedded import embedded_server

# -- which server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One PostgreSQL server, addressed for both sides of a comparison."""

    url: str  # SQLAlchemy URL (any driver), for depeche-nb; see url_for
    libpq_dsn: str  # for psycopg2.connect(), for the baselines
    source: str  # where the address came from, for the report

    def url_for(self, driver: str) -> str:
        """The SQLAlchemy URL of this server with `driver` ("psycopg" or "psycopg2")."""
        url = sa.make_url(self.url).set(drivername=f"postgresql+{check_driver(driver)}")
        return url.render_as_string(hide_password=False)

    def engine(self, driver: str, **options: Any) -> sa.Engine:
        return sa.create_engine(self.url_for(driver), **options)

    def connect(self) -> Any:
        """A plain psycopg2 connection (non-autocommit, the driver's default)."""
        return psycopg2.connect(self.libpq_dsn)


def _sqlalchemy_url(dsn: str) -> sa.URL:
    if "://" in dsn:
        return sa.make_url(normalize_dsn(dsn))
    # libpq key=value form: keep every parameter, as a query the psycopg2 dialect passes on.
    params = psycopg2.extensions.parse_dsn(dsn)
    return sa.URL.create(
        f"postgresql+{default_driver()}",
        username=params.pop("user", None),
        password=params.pop("password", None),
        database=params.pop("dbname", None),
        query=params,
    )


def _libpq_dsn(url: sa.URL) -> str:
    """The psycopg2 dialect's reading of `url`, whichever driver it names (psycopg 3's adds
    non-libpq arguments such as its adapters `context`)."""
    url = url.set(drivername="postgresql+psycopg2")
    engine = sa.create_engine(url)  # no connection is opened; only the dialect is used
    try:
        cargs, cparams = engine.dialect.create_connect_args(url)
    finally:
        engine.dispose()
    base = cargs[0] if cargs else ""
    return psycopg2.extensions.make_dsn(base or None, **cparams)


def resolve_server(dsn: str | None = None) -> Server:
    """`dsn`, else `DEPECHE_NB_DSN`, else the (started) embedded server of `depeche_nb.connect()`."""
    if dsn:
        source, raw = "--dsn", dsn
    elif os.environ.get(DSN_ENV):
        source, raw = DSN_ENV, os.environ[DSN_ENV]
    else:
        server = embedded_server()
        url = server.start()
        return Server(
            url=url, libpq_dsn=server.libpq_dsn, source=f"embedded server, data in {server.data_dir}"
        )
    url_obj = _sqlalchemy_url(raw)
    return Server(
        url=url_obj.render_as_string(hide_password=False), libpq_dsn=_libpq_dsn(url_obj), source=source
    )


def _libpq(version: int) -> str:
    return f"{version // 10000}.{version % 10000}"  # 180006 -> "18.6"


def describe_server(server: Server, settings: Sequence[str] = ()) -> list[str]:
    """Lines naming the server, its version and `settings`, plus the client machine."""
    conn = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT version()")
            (version,) = cur.fetchone()
            values = []
            for name in settings:
                cur.execute("SELECT current_setting(%s)", (name,))
                values.append(f"{name}={cur.fetchone()[0]}")
        conn.rollback()
    finally:
        conn.close()
    return [
        f"server:   {version}",
        f"address:  {server.source}",
        f"settings: {', '.join(values)}",
        f"client:   Python {platform.python_version()}, SQLAlchemy {sa.__version__}, "
        f"{os.cpu_count()} CPUs ({platform.machine()})",
        f"drivers:  psycopg {psycopg.__version__} ({psycopg.pq.__impl__}, "
        f"libpq {_libpq(psycopg.pq.version())}), "
        f"psycopg2 {psycopg2.__version__.split()[0]} (libpq {_libpq(psycopg2.extensions.libpq_version())})",
    ]


def parse_drivers(text: str) -> tuple[str, ...]:
    """`--drivers`: a comma-separated list of "psycopg" and "psycopg2"."""
    drivers = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    try:
        if not drivers:
            raise ValueError("--drivers needs at least one driver")
        return tuple(check_driver(driver, "--drivers") for driver in drivers)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_drivers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--drivers",
        type=parse_drivers,
        default=DRIVERS,
        help=f"drivers to measure ours with, comma-separated (default: {','.join(DRIVERS)})",
    )


def describe_code(package: str = "depeche_nb") -> str:
    """The measured code: the package version and, from a git checkout, its commit."""
    module = importlib.import_module(package)
    path = Path(module.__file__ or ".").resolve().parent
    line = f"code:     {package} {getattr(module, '__version__', '?')} from {path}"
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return line
    return f"{line}, git {commit}{' + uncommitted changes' if dirty else ''}"


def load_average() -> str:
    """The machine's 1/5/15-minute load averages: other work on it distorts every figure."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average: unknown"
    return f"load average: {one:.2f} {five:.2f} {fifteen:.2f} (on {os.cpu_count()} CPUs)"


# -- running a step in N processes ------------------------------------------------------------

# A worker factory runs in the child process, after start: it opens what it
# needs (engine, store, connection) and returns a step function. Each call of
# the step does one unit of work and returns how many items (rows, messages)
# it handled. Both must be importable top-level objects (spawn pickles them
# by reference), and `config` must pickle.
Step = Callable[[], int]
WorkerFactory = Callable[[int, Any], Step]

SETUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RunResult:
    processes: int
    count: int  # items over all processes
    per_second: float  # sum over processes of count / elapsed
    steps: int  # step calls over all processes (not counting warm-up)
    client_cpu_s: float  # CPU time of the worker processes while measured (not the server's)

    @property
    def client_cpu_us_per_item(self) -> float:
        return 1e6 * self.client_cpu_s / self.count if self.count else 0.0


# count, steps, elapsed seconds, CPU seconds of one worker
_Outcome = tuple[int, int, float, float]


def _child(
    factory: WorkerFactory,
    config: Any,
    index: int,
    duration: float,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue[tuple[int, _Outcome | None, str | None]],
) -> None:
    try:
        step = factory(index, config)
        step()  # warm-up: connections, caches, plans; not counted
    except BaseException:
        results.put((index, None, traceback.format_exc()))
        barrier.abort()
        return
    try:
        barrier.wait(timeout=SETUP_TIMEOUT_S)
    except threading.BrokenBarrierError:
        results.put((index, None, "another worker failed during set-up"))
        return
    count = steps = 0
    cpu_start = time.process_time()  # this process, all threads (e.g. a notifier thread)
    start = time.perf_counter()
    deadline = start + duration
    try:
        while True:
            count += step()
            steps += 1
            now = time.perf_counter()
            if now >= deadline:
                break
    except BaseException:
        results.put((index, None, traceback.format_exc()))
        return
    results.put((index, (count, steps, now - start, time.process_time() - cpu_start), None))


def run_in_processes(factory: WorkerFactory, config: Any, processes: int, duration: float) -> RunResult:
    """Run `factory(i, config)()` in a loop in `processes` spawned processes for `duration` s each.

    The processes set up and warm up first, then start together at a barrier;
    each measures its own time, and the rate is the sum of the per-process rates.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results: multiprocessing.Queue[tuple[int, _Outcome | None, str | None]] = ctx.Queue()
    children = [
        ctx.Process(
            target=_child,
            args=(factory, config, index, duration, barrier, results),
            name=f"bench-worker-{index}",
        )
        for index in range(processes)
    ]
    for child in children:
        child.start()
    outcomes: dict[int, _Outcome] = {}
    errors: list[str] = []
    deadline = time.monotonic() + SETUP_TIMEOUT_S + duration * 3 + 30
    try:
        while len(outcomes) + len(errors) < processes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                errors.append("timed out waiting for the workers")
                break
            try:
                index, outcome, error = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not any(child.is_alive() for child in children) and results.empty():
                    errors.append("workers exited without reporting (crashed?)")
                    break
                continue
            if outcome is not None:
                outcomes[index] = outcome
            else:
                errors.append(f"worker {index}:\n{error}")
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.terminate()
                child.join()
    if errors:
        raise RuntimeError("benchmark workers failed:\n" + "\n".join(errors))
    return RunResult(
        processes=processes,
        count=sum(count for count, _, _, _ in outcomes.values()),
        per_second=sum(count / elapsed for count, _, elapsed, _ in outcomes.values()),
        steps=sum(steps for _, steps, _, _ in outcomes.values()),
        client_cpu_s=sum(cpu for _, _, _, cpu in outcomes.values()),
    )


# -- reporting --------------------------------------------------------------------------------


def paced_writes(
    count: int, rate: float, write: Callable[[int], None]
) -> tuple[dict[int, float], dict[int, float]]:
    """Call `write(number)` for number 0..count-1 at `rate` calls per second; returns when each
    call started and when it returned (`time.monotonic()`), by number: the writer's side of a
    write-to-handler latency figure."""
    sent: dict[int, float] = {}
    wrote: dict[int, float] = {}
    for number in range(count):
        sent[number] = time.monotonic()
        write(number)
        wrote[number] = time.monotonic()
        time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - sent[number])))
    return sent, wrote


@dataclass(frozen=True)
class Target:
    """What a figure should reach: a ratio to the baseline, or an absolute rate."""

    min_ratio: float | None = None
    min_per_second: float | None = None

    def describe(self) -> str:
        if self.min_ratio is not None:
            return f">= {self.min_ratio:g}x"
        if self.min_per_second is not None:
            return f">= {self.min_per_second:,.0f}/s"
        return ""

    def met(self, ours: float, baseline: float | None) -> bool | None:
        if self.min_ratio is not None:
            return None if not baseline else ours / baseline >= self.min_ratio
        if self.min_per_second is not None:
            return ours >= self.min_per_second
        return None


@dataclass(frozen=True)
class Row:
    name: str
    ours: Mapping[str, float]  # per second, per driver
    baseline: float | None = None  # per second, same unit
    target: Target | None = None

    def ratio(self, driver: str) -> float | None:
        return self.ours[driver] / self.baseline if self.baseline else None


def print_table(rows: Sequence[Row], *, unit: str = "per s") -> None:
    """Print per figure: ours per driver, the baseline, ratio ours/baseline per driver,
    the first driver's figure over the second's, the target and the drivers missing it."""
    drivers = list(dict.fromkeys(driver for row in rows for driver in row.ours))
    versus = drivers[:2] if len(drivers) > 1 else []
    header = (
        f"figure ({unit})",
        *(f"ours[{d}]" for d in drivers),
        "baseline",
        *(f"ratio[{d}]" for d in drivers),
        *(["/".join(versus)] if versus else []),
        "target",
        "",
    )
    body: list[tuple[str, ...]] = []
    for row in rows:
        ratios = [row.ratio(d) for d in drivers]
        met = {d: row.target.met(row.ours[d], row.baseline) for d in drivers} if row.target else {}
        missed = [d for d, ok in met.items() if ok is False]
        body.append(
            (
                row.name,
                *(f"{row.ours[d]:,.0f}" for d in drivers),
                "" if row.baseline is None else f"{row.baseline:,.0f}",
                *("" if r is None else f"{r:.2f}x" for r in ratios),
                *([f"{row.ours[versus[0]] / row.ours[versus[1]]:.2f}x"] if versus else []),
                row.target.describe() if row.target else "",
                f"MISSED by {', '.join(missed)}" if missed else ("ok" if any(met.values()) else ""),
            )
        )
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    right = set(range(1, len(header) - 2))

    def fmt(line: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(line)
        ]
        return " | ".join(cells).rstrip()

    print(fmt(header))
    print("-+-".join("-" * width for width in widths))
    for line in body:
        print(fmt(line))


__all__ = [
    "Row",
    "RunResult",
    "Server",
    "Step",
    "Target",
    "WorkerFactory",
    "add_drivers_option",
    "describe_code",
    "describe_server",
    "load_average",
    "parse_drivers",
    "print_table",
    "resolve_server",
    "run_in_processes",
]


# The event the engine and display benchmarks write: a number and the two protocol fields.
class BenchEvent(pydantic.BaseModel):
    number: int
    message_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    occurred_at: dt.datetime = pydantic.Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return self.occurred_at
