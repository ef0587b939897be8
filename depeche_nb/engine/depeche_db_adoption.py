"""Adopt a Depeche DB 0.13 database in place: `adopt_depeche_db(engine)`.

Run it with Depeche DB's writers, projectors and subscription runners
stopped. Afterwards `MessageStore(name=S)`, `store.aggregated_stream(name=A,
...)` and `stream.subscription(name=U)` with the names used under Depeche DB
see the same messages, the same partition assignments and continue each
subscription from its stored position.

Technique: copy, keep the originals
-----------------------------------
Every row is copied into depeche-nb's tables in one transaction; Depeche
DB's tables are left exactly as they were (so going back is possible: drop
depeche-nb's tables and start Depeche DB again). Nothing is renamed, no
trigger or function of Depeche DB is touched.

* Messages keep id, stream, version, payload and global position (inserted
  with OVERRIDING SYSTEM VALUE); the identity then continues after the higher
  of the last position and Depeche DB's sequence, so a position is never
  handed out twice. `added_at` (stored without time zone) is read as local
  time of `timezone`.
* Assignments keep partition and position of every projected message; the
  heads continue from each partition's highest position.
* Subscription state rows (positions and the "initialised" marker) are copied
  as they are: a subscription resumes after its last acknowledged position.

Why the projector then projects exactly the unprojected messages
-----------------------------------------------------------------
depeche-nb's projector (see `engine.projector`) treats a message as done
exactly when its `txid` is visible in the stream's checkpoint snapshot
`seen`, and projects the others once they are visible in a current snapshot.
Adoption therefore writes each copied message with a constructed `txid` and
each adopted stream with a constructed `seen`:

* For one store with adopted streams A_0..A_n-1, a message's *membership
  mask* has bit i set when A_i holds it. The k distinct masks present get
  the ids Y-k .. Y-1 (ascending with the mask), where Y is the xmin of the
  adoption's snapshot: every transaction running then or later has an id
  >= Y, so these ids are visible in every snapshot taken afterwards.
* `seen` of A_i is `Y-k : Y : <ids of the masks without bit i>`. Visibility
  in a pg_snapshot is arithmetic (below xmin, or below xmax and not listed),
  so exactly the messages A_i holds are visible in it; the ones it does not
  hold are listed as in progress, so the first step reads them (through the
  txid index) and projects those matching the wildcards, in global-position
  order, after the adopted heads. Messages written later get real ids >= Y
  = xmax, invisible in `seen` as usual. No message is projected twice (the
  held ones are visible) and none is skipped (the others are not).

A second run changes nothing: every adoption is recorded in
`depeche_nb_adoptions` together with what the Depeche DB table held; an
adopted object is skipped if its source is unchanged and reported as an
error if it changed (Depeche DB's workers were not stopped).

What cannot be read from Depeche DB's tables: the wildcards and partitioner of
an aggregated stream and which stream a subscription reads. Pass the same
partitioner and wildcards to `aggregated_stream(...)` as under Depeche DB;
depeche-nb's projector applies them only to messages that were not projected
yet.
"""

from __future__ import annotations

import dataclasses as _dc
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from depeche_nb.core.display import RichRepr, run_view
from depeche_nb.core.errors import AdoptionError, InvalidIdentifierError
from depeche_nb.core.identifiers import validate_name
from depeche_nb.postgres import depeche_db_tables as ddb
from depeche_nb.postgres.driver import sqlstate
from depeche_nb.postgres.messages_table import ensure_store_schema
from depeche_nb.postgres.names import StoreNames, lock_namespace
from depeche_nb.postgres.state_table import StateTable
from depeche_nb.postgres.stream_tables import StreamNames, ensure_stream_schema

if TYPE_CHECKING:
    import pandas as pd

STORE = "store"
STREAM = "aggregated_stream"
STATE = "subscription_state"

ADOPTED = "adopted"
WOULD_ADOPT = "would adopt"
ALREADY = "already adopted"
SKIPPED = "skipped"

KEPT = (
    "Depeche DB's tables, functions and triggers are left unchanged (copy, not move): to go back, "
    "drop depeche-nb's tables and start Depeche DB's workers again. Do not run Depeche DB's "
    "writers or workers after adopting: what they write is not seen by depeche-nb."
)

_ADOPT_LOCK = lock_namespace("adopt", "depeche_db")
_LOCK_NOT_AVAILABLE = "55P03"


@_dc.dataclass(frozen=True)
class AdoptionItem:
    """One Depeche DB object and what adoption did (or would do) with it."""

    kind: str  # "store", "aggregated_stream" or "subscription_state"
    name: str
    source: str  # the Depeche DB table
    target: str  # depeche-nb's table(s)
    action: str  # adopted / would adopt / already adopted / skipped
    rows: int  # messages, assignments or state rows
    note: str = ""


@_dc.dataclass
class AdoptionReport(RichRepr):
    """What `adopt_depeche_db` did: one item per Depeche DB object, warnings, and what is kept."""

    dry_run: bool
    timezone: str
    items: list[AdoptionItem] = _dc.field(default_factory=list)
    warnings: list[str] = _dc.field(default_factory=list)
    kept: str = KEPT

    @property
    def changed(self) -> bool:
        return any(item.action == ADOPTED for item in self.items)

    def to_dataframe(self) -> pd.DataFrame:
        return run_view("adoption_report", self)  # type: ignore[no-any-return]

    def summary(self) -> str:
        if not self.items:
            return "no Depeche DB tables found"
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.action] = counts.get(item.action, 0) + 1
        return ", ".join(f"{n} {action}" for action, n in counts.items())

    def __repr__(self) -> str:
        return f"<AdoptionReport {'dry run: ' if self.dry_run else ''}{self.summary()}>"

    def __str__(self) -> str:
        head = "Dry run, nothing changed" if self.dry_run else "Adoption of a Depeche DB database"
        lines = [f"{head} (Depeche DB times read as {self.timezone}): {self.summary()}"]
        for i in self.items:
            lines.append(
                f"  {i.action:<15} {i.kind:<18} {i.name:<24} {i.rows:>9} rows  {i.source} -> {i.target}"
            )
            if i.note:
                lines.append(f"  {'':<15} {i.note}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        lines.append(self.kept)
        return "\n".join(lines)


# -- planning ---------------------------------------------------------------------------------


@_dc.dataclass
class _StorePlan:
    source: ddb.DdbStore
    names: StoreNames
    stats: ddb.StoreStats
    streams: list[_StreamPlan] = _dc.field(default_factory=list)
    adopt: bool = False


@_dc.dataclass
class _StreamPlan:
    source: ddb.DdbStream
    names: StreamNames
    store: _StorePlan
    assignments: int
    partitions: list[ddb.PartitionRow]
    unprojected: int
    adopt: bool = False


@_dc.dataclass
class _StatePlan:
    source: ddb.DdbStateTable
    target: str
    rows: list[tuple[str, int, int]]
    adopt: bool = False


@_dc.dataclass
class _Plan:
    stores: list[_StorePlan] = _dc.field(default_factory=list)
    states: list[_StatePlan] = _dc.field(default_factory=list)
    items: list[AdoptionItem] = _dc.field(default_factory=list)
    warnings: list[str] = _dc.field(default_factory=list)
    problems: list[str] = _dc.field(default_factory=list)


def _valid(name: str, what: str) -> str | None:
    """None if `name` is usable by depeche-nb, else why not."""
    try:
        validate_name(name, what)
    except InvalidIdentifierError as exc:
        return str(exc)
    return None


def _changed(entry: ddb.RegisterEntry, now: dict[str, Any]) -> str | None:
    if entry.source_state == now:
        return None
    return (
        f"{entry.source_table} changed since it was adopted at {entry.adopted_at} "
        f"(then {entry.source_state}, now {now}): were Depeche DB's writers or workers still running? "
        "depeche-nb does not see what they wrote since"
    )


def _plan(
    conn: sa.Connection,
    catalog: ddb.DdbCatalog,
    register: dict[tuple[str, str], ddb.RegisterEntry],
    timezone: str,
    stream_stores: Mapping[str, str],
    exclude: Collection[str],
    dry_run: bool,
) -> _Plan:
    plan = _Plan()
    new = WOULD_ADOPT if dry_run else ADOPTED
    stores: dict[str, _StorePlan] = {}
    for source in catalog.stores:
        stats = ddb.store_stats(conn, source, timezone)
        why_not = "excluded" if source.name in exclude else _valid(source.name, "store name")
        names = None if why_not else StoreNames(source.name)
        target = names.messages_table if names else "—"
        if why_not or names is None:
            plan.items.append(
                AdoptionItem(
                    STORE, source.name, str(source.table), target, SKIPPED, stats.messages, why_not or ""
                )
            )
            continue
        sp = _StorePlan(source, names, stats)
        stores[source.name] = sp
        entry = register.get((STORE, source.name))
        if entry is not None:
            problem = _changed(entry, ddb.store_fingerprint(conn, source))
            if problem:
                plan.problems.append(problem)
            plan.items.append(
                AdoptionItem(STORE, source.name, str(source.table), target, ALREADY, stats.messages)
            )
        else:
            if ddb.table_exists(conn, target) and (n := ddb.row_count(conn, target)):
                plan.problems.append(
                    f"depeche-nb's store {source.name!r} already holds {n} message(s) in {target}; "
                    "adoption copies into an empty store only"
                )
            sp.adopt = True
            first, last = stats.first_global_position, stats.last_global_position
            note = f"global positions {first} to {last}" if stats.messages else "empty"
            plan.items.append(
                AdoptionItem(STORE, source.name, str(source.table), target, new, stats.messages, note)
            )
        plan.stores.append(sp)

    for stream in catalog.streams:
        _plan_stream(conn, plan, catalog, stores, register, stream, timezone, stream_stores, exclude, new)

    for state in catalog.state_tables:
        _plan_state(conn, plan, catalog, register, state, exclude, new)
    return plan


def _plan_stream(
    conn: sa.Connection,
    plan: _Plan,
    catalog: ddb.DdbCatalog,
    stores: dict[str, _StorePlan],
    register: dict[tuple[str, str], ddb.RegisterEntry],
    stream: ddb.DdbStream,
    timezone: str,
    stream_stores: Mapping[str, str],
    exclude: Collection[str],
    new: str,
) -> None:
    source = str(stream.table)
    partitions = ddb.stream_partitions(conn, stream, timezone)
    assignments = sum(p.messages for p in partitions)
    why_not = "excluded" if stream.name in exclude else _valid(stream.name, "aggregated stream name")
    if why_not:
        plan.items.append(AdoptionItem(STREAM, stream.name, source, "—", SKIPPED, assignments, why_not))
        return
    if not assignments and stream.name not in stream_stores and len(catalog.stores) != 1:
        plan.items.append(
            AdoptionItem(
                STREAM,
                stream.name,
                source,
                "—",
                SKIPPED,
                0,
                "empty, nothing to carry over; depeche-nb projects it from the start on first use",
            )
        )
        return
    store_name = _store_of(conn, plan, catalog, stream, assignments, stream_stores)
    if store_name is None:
        return
    sp = stores.get(store_name)
    if sp is None:
        plan.items.append(
            AdoptionItem(
                STREAM,
                stream.name,
                source,
                "—",
                SKIPPED,
                assignments,
                f"its store {store_name!r} is not adopted",
            )
        )
        return
    names = StreamNames(stream.name, sp.names)
    target = f"{names.table}, {names.heads_table}, {names.checkpoint_table}"
    entry = register.get((STREAM, stream.name))
    if entry is not None:
        problem = _changed(entry, ddb.stream_fingerprint(conn, stream))
        if problem:
            plan.problems.append(problem)
        plan.items.append(
            AdoptionItem(
                STREAM, stream.name, source, target, ALREADY, assignments, f"over store {store_name!r}"
            )
        )
        return
    if not sp.adopt:
        plan.problems.append(
            f"aggregated stream {stream.name!r} reads store {store_name!r}, which was adopted earlier "
            "without it; adopt a store together with all its aggregated streams (or pass "
            f"exclude=[{stream.name!r}] and let depeche-nb project it from scratch)"
        )
        return
    for table in (names.table, names.heads_table):
        if ddb.table_exists(conn, table) and (n := ddb.row_count(conn, table)):
            plan.problems.append(
                f"depeche-nb's aggregated stream {stream.name!r} already has {n} row(s) in {table}; "
                "adoption copies into an empty stream only"
            )
    if bad := ddb.bad_assignments(conn, stream):
        plan.problems.append(f"{source} has {bad} row(s) with a negative partition or position")
    unprojected = ddb.unprojected_in_known_streams(conn, stream, sp.source)
    _stream_warnings(conn, plan, stream, sp.source, partitions)
    sp.streams.append(_StreamPlan(stream, names, sp, assignments, partitions, unprojected, adopt=True))
    note = f"over store {store_name!r}, {len(partitions)} partition(s)"
    if unprojected:
        note += f"; {unprojected} message(s) of its origin streams not projected yet (depeche-nb will)"
    plan.items.append(AdoptionItem(STREAM, stream.name, source, target, new, assignments, note))


def _store_of(
    conn: sa.Connection,
    plan: _Plan,
    catalog: ddb.DdbCatalog,
    stream: ddb.DdbStream,
    assignments: int,
    stream_stores: Mapping[str, str],
) -> str | None:
    """The store an aggregated stream reads: given, or the one holding all its messages."""
    given = stream_stores.get(stream.name)
    candidates = [given] if given is not None else [s.name for s in catalog.stores]
    if given is not None and given not in {s.name for s in catalog.stores}:
        plan.problems.append(
            f"stream_stores names store {given!r} for {stream.name!r}, but no such store exists"
        )
        return None
    matching = []
    for name in candidates:
        total, matched = ddb.stream_store_matches(conn, stream, catalog.store(name))
        if total == matched:
            matching.append(name)
    if assignments and given is not None and not matching:
        plan.problems.append(
            f"aggregated stream {stream.name!r} holds messages that store {given!r} does not have "
            "(or with another global position, stream or version)"
        )
        return None
    if assignments and not matching:
        plan.problems.append(
            f"aggregated stream {stream.name!r} holds messages that no store has (with the same id, "
            "global position, stream and version); was a store truncated? nothing can be adopted so"
        )
        return None
    if len(matching) > 1:
        plan.problems.append(
            f"cannot tell which store aggregated stream {stream.name!r} reads ({', '.join(matching)} all "
            f"fit); pass stream_stores={{{stream.name!r}: <store>}} (CLI: --stream-store "
            f"{stream.name}=<store>)"
        )
        return None
    return matching[0] if matching else None


def _stream_warnings(
    conn: sa.Connection,
    plan: _Plan,
    stream: ddb.DdbStream,
    store: ddb.DdbStore,
    partitions: list[ddb.PartitionRow],
) -> None:
    gaps = sum(p.gaps for p in partitions)
    not_from_zero = [p.partition for p in partitions if p.first_position != 0]
    if gaps or not_from_zero:
        plan.warnings.append(
            f"aggregated stream {stream.name!r}: {gaps} position gap(s)"
            + (f", partitions {not_from_zero} do not start at 0" if not_from_zero else "")
            + " (copied as they are; lag counts include the gaps)"
        )
    mismatched = [p.partition for p in partitions if p.recorded_max_position not in (None, p.head_position)]
    if mismatched:
        plan.warnings.append(
            f"aggregated stream {stream.name!r}: {stream.maxpos} disagrees with the stream table for "
            f"partitions {mismatched}; positions continue after the highest assigned position"
        )
    if behind := ddb.skipped_behind_later_versions(conn, stream, store):
        plan.warnings.append(
            f"aggregated stream {stream.name!r}: {behind} stored message(s) were skipped by Depeche DB's "
            "projector (a later version of their stream is projected); depeche-nb projects them now, "
            "after those later versions"
        )


def _plan_state(
    conn: sa.Connection,
    plan: _Plan,
    catalog: ddb.DdbCatalog,
    register: dict[tuple[str, str], ddb.RegisterEntry],
    state: ddb.DdbStateTable,
    exclude: Collection[str],
    new: str,
) -> None:
    source = str(state.table)
    rows = ddb.state_rows(conn, state)
    why_not = "excluded" if state.provider in exclude else _valid(state.provider, "state provider name")
    if why_not:
        plan.items.append(AdoptionItem(STATE, state.provider, source, "—", SKIPPED, len(rows), why_not))
        return
    target = StateTable(state.provider).name
    subscriptions = sorted({r[0] for r in rows})
    note = _describe_subscriptions(conn, catalog, rows)
    entry = register.get((STATE, state.provider))
    if entry is not None:
        problem = _changed(entry, ddb.state_fingerprint(conn, state))
        if problem:
            plan.problems.append(problem)
        plan.items.append(AdoptionItem(STATE, state.provider, source, target, ALREADY, len(rows), note))
        return
    if ddb.table_exists(conn, target):
        taken = ddb.target_state_names(conn, target) & set(subscriptions)
        if taken:
            plan.problems.append(
                f"depeche-nb already has state for subscription(s) {sorted(taken)} in {target}; "
                "adoption does not overwrite positions"
            )
    plan.states.append(_StatePlan(state, target, rows, adopt=True))
    plan.items.append(AdoptionItem(STATE, state.provider, source, target, new, len(rows), note))


def infer_subscription_streams(
    positions: Mapping[str, Mapping[int, int]], heads: Mapping[str, Mapping[int, int]]
) -> dict[str, list[str]]:
    """Per subscription: the aggregated streams its positions fit (every partition it has a
    position for exists there, and no position is beyond that partition's head)."""
    fits: dict[str, list[str]] = {}
    for subscription, parts in positions.items():
        fits[subscription] = [
            stream
            for stream, stream_heads in heads.items()
            if all(p in stream_heads and pos <= stream_heads[p] for p, pos in parts.items())
        ]
    return fits


def _describe_subscriptions(
    conn: sa.Connection, catalog: ddb.DdbCatalog, rows: list[tuple[str, int, int]]
) -> str:
    positions: dict[str, dict[int, int]] = {}
    initialised: set[str] = set()
    for name, partition, position in rows:
        positions.setdefault(name, {})
        if partition == ddb.INIT_PARTITION:
            initialised.add(name)
        else:
            positions[name][partition] = position
    heads = {s.name: ddb.stream_heads(conn, s) for s in catalog.streams}
    fits = infer_subscription_streams(positions, heads)
    parts = []
    for name in sorted(positions):
        on = f" on {fits[name][0]!r}" if len(fits[name]) == 1 else ""
        state = "initialised" if name in initialised else "not initialised"
        parts.append(f"{name} ({state}, {len(positions[name])} partition position(s){on})")
    return "subscriptions: " + ", ".join(parts) if parts else "no subscriptions"


# -- doing it ---------------------------------------------------------------------------------


def adopt_depeche_db(
    engine: sa.Engine,
    *,
    dry_run: bool = False,
    timezone: str | None = None,
    stream_stores: Mapping[str, str] | None = None,
    exclude: Collection[str] = (),
) -> AdoptionReport:
    """Adopt every Depeche DB 0.13 store, aggregated stream and subscription state table of
    the database in place (see the module notes). Idempotent; stop Depeche DB's writers and
    workers first.

    `dry_run`: plan only, in a read-only transaction, and report what would be done.
    `timezone`: how to read Depeche DB's time-zone-less timestamps (default: this session's
    `TimeZone`, normally the server's, which is what Depeche DB's sessions wrote in).
    `stream_stores`: `{aggregated stream: store}` where the store cannot be inferred.
    `exclude`: Depeche DB names (stores, streams, state providers) to leave alone.

    Raises `AdoptionError` (nothing changed) when the data is inconsistent, depeche-nb's
    tables of the same names are in use, or Depeche DB's tables are being written.
    """
    if isinstance(exclude, str):
        raise TypeError("exclude must be a collection of names, not one str")
    with engine.connect() as conn:
        if dry_run:
            ddb.begin_read_only(conn)
        else:
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s, 0)", (_ADOPT_LOCK,))
        zone = ddb.check_timezone(conn, timezone) if timezone else ddb.session_timezone(conn)
        catalog = ddb.discover(conn)
        if not dry_run:
            _lock_sources(conn, catalog, set(exclude))
        plan = _plan(
            conn, catalog, ddb.register_entries(conn), zone, dict(stream_stores or {}), set(exclude), dry_run
        )
        if plan.problems:
            conn.rollback()
            raise AdoptionError("cannot adopt; nothing was changed:\n- " + "\n- ".join(plan.problems))
        report = AdoptionReport(dry_run=dry_run, timezone=zone, items=plan.items, warnings=plan.warnings)
        if dry_run or not (any(s.adopt for s in plan.stores) or any(s.adopt for s in plan.states)):
            conn.rollback()
            return report
        _ensure_schemas(engine, plan)
        _execute(conn, plan, zone)
        conn.commit()
    return report


def _lock_sources(conn: sa.Connection, catalog: ddb.DdbCatalog, exclude: Collection[str]) -> None:
    tables = [s.table for s in catalog.stores if s.name not in exclude]
    tables += [s.table for s in catalog.streams if s.name not in exclude]
    tables += [s.maxpos for s in catalog.streams if s.maxpos is not None and s.name not in exclude]
    tables += [s.table for s in catalog.state_tables if s.provider not in exclude]
    for table in tables:
        try:
            ddb.lock_source(conn, table)
        except sa.exc.OperationalError as exc:
            if sqlstate(exc) != _LOCK_NOT_AVAILABLE:
                raise
            conn.rollback()
            raise AdoptionError(
                f"{table} is in use (a Depeche DB writer, projector or runner has it open): stop "
                "Depeche DB's writers and workers, then adopt; nothing was changed"
            ) from exc


def _ensure_schemas(engine: sa.Engine, plan: _Plan) -> None:
    """depeche-nb's own tables, created as `MessageStore(...)` etc. would create them (each in
    its own short transaction, outside the adoption's)."""
    for sp in plan.stores:
        if sp.adopt:
            ensure_store_schema(engine, sp.names)
            for stream in sp.streams:
                ensure_stream_schema(engine, stream.names)
    for state in plan.states:
        if state.adopt:
            StateTable(state.source.provider).ensure(engine)


def _execute(conn: sa.Connection, plan: _Plan, timezone: str) -> None:
    ddb.create_register(conn)
    try:
        for sp in plan.stores:
            if sp.adopt:
                ddb.lock_target(conn, sp.names.messages_table)
                for stream in sp.streams:
                    ddb.lock_target(conn, stream.names.table)
        for state in plan.states:
            if state.adopt:
                ddb.lock_target(conn, state.target)
    except sa.exc.OperationalError as exc:
        if sqlstate(exc) != _LOCK_NOT_AVAILABLE:
            raise
        conn.rollback()
        raise AdoptionError(
            "depeche-nb's tables of these names are in use by a depeche-nb writer or projector; "
            "stop it and adopt again; nothing was changed"
        ) from exc
    for sp in plan.stores:
        if sp.adopt:
            _adopt_store(conn, sp, timezone)
    for state in plan.states:
        if state.adopt:
            ddb.adopt_state(conn, state.source, state.target)
            ddb.record_adoption(
                conn,
                STATE,
                state.source.provider,
                state.source.table,
                ddb.state_fingerprint(conn, state.source),
                {"target": state.target, "subscriptions": sorted({r[0] for r in state.rows})},
            )


def _adopt_store(conn: sa.Connection, sp: _StorePlan, timezone: str) -> None:
    streams = [s.source for s in sp.streams]
    if len(streams) > 62:
        raise AdoptionError(f"store {sp.source.name!r} has more than 62 aggregated streams; adopt fewer")
    for stream in sp.streams:
        lock_a, lock_b = stream.names.projector_lock
        got = conn.exec_driver_sql("SELECT pg_try_advisory_xact_lock(%s, %s)", (lock_a, lock_b)).scalar_one()
        if not got:
            conn.rollback()
            raise AdoptionError(
                f"a depeche-nb projector of {stream.names.stream!r} is running; stop it and adopt again"
            )
    masks = ddb.membership_masks(conn, sp.source, streams)
    horizon = ddb.oldest_running_xid(conn)
    if len(masks) >= horizon:
        raise AdoptionError("the cluster's transaction ids are too young to construct checkpoints")
    txid_of_mask = {mask: horizon - len(masks) + i for i, mask in enumerate(masks)}
    ddb.adopt_messages(conn, sp.source, sp.names.messages_table, timezone, streams, txid_of_mask)
    last = max(sp.stats.last_global_position or 0, sp.stats.sequence_last_value or 0)
    ddb.continue_global_positions(conn, sp.names.messages_table, last)
    checkpoints: dict[str, str | None] = {}
    for bit, stream in enumerate(sp.streams):
        names = stream.names
        ddb.adopt_assignments(conn, stream.source, names.table, sp.names.messages_table, timezone)
        ddb.adopt_heads(conn, names.heads_table, names.table)
        seen = checkpoint_snapshot(txid_of_mask, bit, horizon)
        ddb.set_checkpoint(conn, names.checkpoint_table, seen)
        checkpoints[names.stream] = seen
        ddb.record_adoption(
            conn,
            STREAM,
            names.stream,
            stream.source.table,
            ddb.stream_fingerprint(conn, stream.source),
            # Depeche DB records neither wildcards nor partitioner: the first
            # `aggregated_stream(...)` call under this name supplies them.
            {"store": sp.names.store, "seen": seen, "wildcards": None, "partitioner": None},
        )
        ddb.notify(conn, names.channel)
    ddb.record_adoption(
        conn,
        STORE,
        sp.names.store,
        sp.source.table,
        ddb.store_fingerprint(conn, sp.source),
        {
            "target": sp.names.messages_table,
            "timezone": timezone,
            "streams": [s.names.stream for s in sp.streams],
            "txid_of_mask": {str(k): v for k, v in txid_of_mask.items()},
            "global_positions_continue_after": last,
        },
    )
    # Wake a waiting projector: the unprojected messages are there now.
    ddb.notify(conn, sp.names.channel)


def checkpoint_snapshot(txid_of_mask: Mapping[int, int], bit: int, horizon: int) -> str | None:
    """The `seen` snapshot in which exactly the messages whose mask has `bit` are visible
    (None when the store is empty: nothing seen, the projector starts from the beginning)."""
    if not txid_of_mask:
        return None
    xmin = min(txid_of_mask.values())
    in_progress = sorted(txid for mask, txid in txid_of_mask.items() if not mask & (1 << bit))
    return f"{xmin}:{horizon}:{','.join(str(t) for t in in_progress)}"


__all__ = [
    "KEPT",
    "AdoptionError",
    "AdoptionItem",
    "AdoptionReport",
    "adopt_depeche_db",
    "checkpoint_snapshot",
    "infer_subscription_streams",
]
