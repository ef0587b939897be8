"""The `depeche-nb` command: the embedded database, the tutorials, an environment check, adoption.

Exit codes: 0 success, 1 a check or tutorial failed (or `db status`: stopped),
2 usage error or a missing optional package, 3 the database could not be reached
or started.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from depeche_nb.core.errors import EmbeddedServerError, UnsupportedServerError
from depeche_nb.postgres.connection import DSN_ENV
from depeche_nb.postgres.embedded import embedded_server

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3
# The doctor must answer quickly even when DEPECHE_NB_DSN names an unreachable host.
DOCTOR_CONNECT_TIMEOUT_S = 5
WIDGETS_LABEXTENSION = "@jupyter-widgets/jupyterlab-manager"
ADOPT_CONNECT_TIMEOUT_S = 10
ADMIN_CONNECT_TIMEOUT_S = 10


def _notebooks_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    here = Path.cwd() / "notebooks"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent / "notebooks"


def cmd_db(args: argparse.Namespace) -> int:
    server = embedded_server(args.data_dir)
    if args.action == "start":
        print(server.start())
        print(f"data: {server.data_dir}", file=sys.stderr)
    elif args.action == "stop":
        server.stop()
        print("stopped")
    elif args.action == "status":
        running = server.is_running()
        print(f"{'running' if running else 'stopped'}  data: {server.data_dir}")
        return 0 if running else EXIT_FAILED
    elif args.action == "url":
        server.start()
        print(server.dsn)
    elif args.action == "psql":
        server.start()
        psql = shutil.which("psql") or str(Path(server.tool("psql")))
        return subprocess.call([psql, server.libpq_dsn])
    return 0


def cmd_tutorials(args: argparse.Namespace) -> int:
    """Execute every tutorial notebook top to bottom in a fresh kernel and report each one,
    in a database of this run's own on the embedded server (or the server DEPECHE_NB_DSN
    names): runs at the same time on one server cannot drop each other's schemas, and
    lock keys and notification channels are per database, so they never meet."""
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError:
        print("the tutorials need nbclient: pip install 'depeche-nb[tutorials]'", file=sys.stderr)
        return EXIT_USAGE
    if importlib.util.find_spec("ipykernel") is None:
        print("the tutorials need ipykernel: pip install 'depeche-nb[tutorials]'", file=sys.stderr)
        return EXIT_USAGE
    folder = _notebooks_dir(args.notebooks)
    if not folder.is_dir():
        print(f"no such folder: {folder} (give --notebooks FOLDER)", file=sys.stderr)
        return EXIT_USAGE
    notebooks = sorted(folder.glob("[0-9]*.ipynb"))
    if not notebooks:
        print(f"no tutorial notebooks (named like 01_name.ipynb) in {folder}", file=sys.stderr)
        return EXIT_USAGE
    import sqlalchemy as sa

    from depeche_nb.postgres.connection import connect

    given = os.environ.get(DSN_ENV)
    if given:
        server_dsn = given
        where = f"the server {DSN_ENV} names ({_shown(server_dsn)})"
    else:
        # One server for all kernels, started once here instead of in each of them.
        server_dsn = embedded_server().start()
        where = f"the embedded server, data folder {embedded_server().data_dir}"
    database = f"tutorials_{uuid.uuid4().hex[:12]}"
    admin = connect(
        server_dsn,
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": ADMIN_CONNECT_TIMEOUT_S},
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{database}"')
    except (sa.exc.OperationalError, UnsupportedServerError) as exc:
        print(f"depeche-nb: cannot use {where}: {_first_line(exc)}", file=sys.stderr)
        return EXIT_DATABASE
    except sa.exc.DBAPIError as exc:
        print(
            f"depeche-nb: cannot create the database {database} for this run on {where}: "
            f"{_first_line(exc)}\nfix: a role that may create databases (ALTER ROLE ... CREATEDB), "
            f"or the embedded server (unset {DSN_ENV})",
            file=sys.stderr,
        )
        return EXIT_DATABASE
    run_dsn = sa.make_url(server_dsn).set(database=database).render_as_string(hide_password=False)
    os.environ[DSN_ENV] = run_dsn  # the kernels inherit it
    failures = 0
    try:
        for path in notebooks:
            started = time.monotonic()
            notebook = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
            client = NotebookClient(
                notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
            )
            # The kernel's own stderr (start-up warnings) is shown only when the tutorial fails.
            with tempfile.TemporaryFile("w+") as kernel_stderr:
                try:
                    client.execute(stderr=kernel_stderr)
                except Exception as exc:  # report and continue with the next tutorial
                    failures += 1
                    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc
                    print(f"FAIL {path.name}: {reason}")
                    kernel_stderr.seek(0)
                    sys.stderr.write(kernel_stderr.read())
                    continue
            if args.write:
                # Run timestamps and widget models change on every run; the outputs keep each
                # widget's static HTML fallback for viewers without a kernel.
                for cell in notebook.cells:
                    cell.metadata.pop("execution", None)
                notebook.metadata.pop("widgets", None)
                nbformat.write(notebook, path)  # type: ignore[no-untyped-call]
            print(f"ok   {path.name} ({time.monotonic() - started:.1f} s)")
    finally:
        if given:
            os.environ[DSN_ENV] = given
        else:
            del os.environ[DSN_ENV]
        kept = "--keep" if args.keep else "a tutorial failed" if failures else ""
        if not kept:
            with admin.connect() as conn:  # FORCE: also ends sessions a notebook left open
                conn.exec_driver_sql(f'DROP DATABASE "{database}" WITH (FORCE)')
    print(f"{len(notebooks) - failures} of {len(notebooks)} tutorials ran cleanly")
    fate = f"kept ({kept}): {_shown(run_dsn)}" if kept else "dropped at the end (--keep keeps it)"
    print(f"data: database {database} on {where}; {fate}")
    if not given:
        print("the embedded server keeps running; stop it with `depeche-nb db stop`")
    return EXIT_FAILED if failures else 0


def _first_line(exc: BaseException) -> str:
    """The first line of a database error's own message, without SQLAlchemy's wrapping."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _shown(url: str) -> str:
    """A database URL fit to print: without its password."""
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


def cmd_lab(args: argparse.Namespace) -> int:
    # This interpreter's JupyterLab, not whichever `jupyter-lab` is first on PATH.
    if importlib.util.find_spec("jupyterlab") is None:
        print(
            f"JupyterLab is not installed for {sys.executable}: pip install 'depeche-nb[lab]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    folder = _notebooks_dir(args.notebooks)
    if not folder.is_dir():
        print(f"no such folder: {folder} (give --notebooks FOLDER)", file=sys.stderr)
        return EXIT_USAGE
    if not os.environ.get(DSN_ENV):
        os.environ[DSN_ENV] = embedded_server().start()
    command = lab_command(folder, args.lab_args, as_root=sys.platform != "win32" and os.geteuid() == 0)
    if sys.platform != "win32":
        # This process becomes JupyterLab, so Ctrl-C and SIGTERM reach it directly (a child
        # would be orphaned by a SIGTERM to us, or killed at once by our KeyboardInterrupt).
        os.execv(sys.executable, command)
    return subprocess.call(command)


def lab_command(folder: Path, lab_args: Sequence[str], *, as_root: bool) -> list[str]:
    """The JupyterLab command line: this interpreter's JupyterLab on `folder` with the user's
    own options; as root (containers, cloud VMs, CI) it needs --allow-root to start at all."""
    allow_root = ["--allow-root"] if as_root and "--allow-root" not in lab_args else []
    return [sys.executable, "-m", "jupyterlab", str(folder), *allow_root, *lab_args]


def _labextension_installed(name: str) -> bool:
    """Whether a prebuilt JupyterLab extension (e.g. `@jupyter-widgets/jupyterlab-manager`) is installed."""
    folders = [Path(sys.prefix) / "share" / "jupyter" / "labextensions"]
    try:
        from jupyter_core.paths import jupyter_path

        folders += [Path(p) for p in jupyter_path("labextensions")]
    except ImportError:
        pass
    return any((folder / name / "package.json").is_file() for folder in folders)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Required parts fail the check (exit 1); optional ones (tutorials, lab) only warn."""
    problems = 0

    def check(name: str, ok: bool, detail: str, fix: str = "", *, required: bool = True) -> None:
        nonlocal problems
        print(f"[{'ok' if ok else 'FAIL' if required else 'warn'}] {name}: {detail}")
        if not ok:
            problems += required
            if fix:
                print(f"       fix: {fix}")

    check("python", sys.version_info >= (3, 10), sys.version.split()[0], "use Python 3.10 or newer")
    for module, fix in (
        ("sqlalchemy", "pip install 'sqlalchemy>=2'"),
        ("psycopg", "pip install 'psycopg[binary]'"),
        ("psycopg2", "pip install psycopg2-binary"),
        ("pydantic", "pip install 'pydantic>=2'"),
        ("pandas", "pip install pandas"),
        ("ipywidgets", "pip install 'ipywidgets>=8'"),
    ):
        try:
            imported = __import__(module)
            check(module, True, getattr(imported, "__version__", "installed"))
        except ImportError:
            check(module, False, "missing", fix)
    lab_widgets = _labextension_installed(WIDGETS_LABEXTENSION)
    check(
        "widgets in JupyterLab",
        lab_widgets,
        f"{WIDGETS_LABEXTENSION} {'installed' if lab_widgets else 'missing'}",
        "pip install 'ipywidgets>=8' jupyterlab_widgets, then restart JupyterLab",
    )
    for module, purpose, fix in (
        ("widgetsnbextension", "widgets in Notebook 6", "pip install widgetsnbextension"),
        ("nbclient", "`depeche-nb tutorials`", "pip install 'depeche-nb[tutorials]'"),
        ("ipykernel", "`depeche-nb tutorials`", "pip install 'depeche-nb[tutorials]'"),
        ("jupyterlab", "`depeche-nb lab`", "pip install 'depeche-nb[lab]'"),
    ):
        found = importlib.util.find_spec(module) is not None
        check(module, found, f"{'installed' if found else 'missing'} (for {purpose})", fix, required=False)
    from_env = os.environ.get(DSN_ENV)
    try:
        import sqlalchemy as sa

        from depeche_nb.postgres.connection import connect

        engine = connect(connect_args={"connect_timeout": DOCTOR_CONNECT_TIMEOUT_S})
        try:
            with engine.connect() as conn:
                version = conn.execute(sa.text("SHOW server_version")).scalar()
        finally:
            engine.dispose()
        source = DSN_ENV if from_env else f"embedded server, data in {embedded_server().data_dir}"
        check("database", True, f"PostgreSQL {version} ({source})")
        _check_server_capabilities(engine, check)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if from_env:
            fix = (
                f"start the server {DSN_ENV} names, correct {DSN_ENV}, or unset it to use the embedded server"
            )
        else:
            fix = "run `depeche-nb db start` and read the server log it shows"
        check("database", False, message, fix)
    return EXIT_FAILED if problems else 0


def _check_server_capabilities(engine: Any, check: Callable[..., None]) -> None:
    """xid8 snapshots, session advisory locks, LISTEN/NOTIFY, and no pooler in between."""
    from depeche_nb.postgres.driver import open_connection
    from depeche_nb.postgres.server_check import problems

    connection = open_connection(engine)
    try:
        found = problems(connection)
    finally:
        connection.close()
    what = "xid8 snapshots, session advisory locks, LISTEN/NOTIFY over a direct connection"
    check(
        "server capabilities",
        not found,
        what if not found else found[0].split("; fix: ")[0],
        "; ".join(f.split("; fix: ", 1)[-1] for f in found),
    )


def cmd_adopt_depeche_db(args: argparse.Namespace) -> int:
    """Adopt a Depeche DB 0.13 database in place (see `depeche_nb.adopt_depeche_db`)."""
    dsn = args.dsn or os.environ.get(DSN_ENV)
    if not dsn:
        print(f"name the database: --dsn URL or the {DSN_ENV} environment variable", file=sys.stderr)
        return EXIT_USAGE
    stream_stores: dict[str, str] = {}
    for pair in args.stream_store:
        stream, sep, store = pair.partition("=")
        if not sep or not stream or not store:
            print(f"--stream-store takes STREAM=STORE, got {pair!r}", file=sys.stderr)
            return EXIT_USAGE
        stream_stores[stream] = store
    import sqlalchemy as sa

    from depeche_nb.engine.depeche_db_adoption import AdoptionError, adopt_depeche_db
    from depeche_nb.postgres.connection import connect

    engine = connect(dsn, connect_args={"connect_timeout": ADOPT_CONNECT_TIMEOUT_S})
    try:
        report = adopt_depeche_db(
            engine,
            dry_run=args.dry_run,
            timezone=args.timezone,
            stream_stores=stream_stores,
            exclude=args.exclude,
        )
    except AdoptionError as exc:
        print(f"depeche-nb: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:  # an unknown --timezone
        print(f"depeche-nb: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except sa.exc.OperationalError as exc:
        first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc).__name__
        print(f"depeche-nb: cannot reach the database: {first}", file=sys.stderr)
        return EXIT_DATABASE
    finally:
        engine.dispose()
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depeche-nb", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="manage the embedded PostgreSQL server")
    db.add_argument("action", choices=["start", "stop", "status", "url", "psql"])
    db.add_argument("--data-dir", default=None, help="data folder (default: per-user data folder)")
    db.set_defaults(func=cmd_db)
    tutorials = commands.add_parser(
        "tutorials",
        help="execute the tutorial notebooks headless",
        description="Execute the tutorial notebooks headless, in a new database of this run's own "
        "(dropped at the end unless kept), on the embedded server or the one DEPECHE_NB_DSN names.",
    )
    tutorials.add_argument("--notebooks", default=None, help="folder with the notebooks")
    tutorials.add_argument("--write", action="store_true", help="save executed outputs back")
    tutorials.add_argument(
        "--keep",
        action="store_true",
        help="keep the run's database (it is kept anyway when a tutorial fails)",
    )
    tutorials.set_defaults(func=cmd_tutorials)
    lab = commands.add_parser(
        "lab",
        help="start JupyterLab on the tutorials",
        description="Start JupyterLab on the tutorials; every other option (e.g. --no-browser "
        "--port=8899), also after --, goes to JupyterLab.",
        # Abbreviations would take JupyterLab's options for ours (--note for --notebooks).
        allow_abbrev=False,
    )
    lab.add_argument("--notebooks", default=None, help="folder with the notebooks")
    lab.set_defaults(func=cmd_lab)
    doctor = commands.add_parser("doctor", help="check the environment and say what to fix")
    doctor.set_defaults(func=cmd_doctor)
    adopt = commands.add_parser(
        "adopt-depeche-db",
        help="adopt a Depeche DB 0.13 database in place (stop its writers and workers first)",
        description="Copy a Depeche DB 0.13 database's stores, aggregated streams and subscription "
        "positions into depeche-nb's tables under the same names; Depeche DB's tables stay "
        "unchanged. Idempotent. Stop Depeche DB's writers and workers first.",
    )
    adopt.add_argument("--dsn", default=None, help=f"database URL (default: ${DSN_ENV})")
    adopt.add_argument("--dry-run", action="store_true", help="only report what would be done")
    adopt.add_argument(
        "--timezone", default=None, help="time zone of Depeche DB's timestamps (default: the server's)"
    )
    adopt.add_argument(
        "--stream-store",
        action="append",
        default=[],
        metavar="STREAM=STORE",
        help="the store an aggregated stream reads, where it cannot be inferred (repeatable)",
    )
    adopt.add_argument(
        "--exclude", action="append", default=[], metavar="NAME", help="a Depeche DB name to leave alone"
    )
    adopt.set_defaults(func=cmd_adopt_depeche_db)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; `lab` keeps the options it does not know, for JupyterLab (`lab_args`)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "lab":
        # Python versions differ in whether they keep the `--` that ends our options.
        if "--" in unknown:
            unknown.remove("--")
        args.lab_args = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args.func(args))
    except EmbeddedServerError as exc:
        print(f"depeche-nb: {exc}", file=sys.stderr)
        return EXIT_DATABASE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
