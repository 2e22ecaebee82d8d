"""The database: engine set-up, migrations, and the one write transaction admission needs.

SQLite (the default) runs in WAL mode so readers never wait on the writer; transactions that
read-then-write a budget use `BEGIN IMMEDIATE`, which takes the write lock at the start instead of
at the first write, so two admissions can never both read the same spare budget. On PostgreSQL
the same transactions lock the agent's row (`SELECT ... FOR UPDATE`).

The tune studies' Optuna storage shares this database by default (`server/optuna_study.py`): Optuna's
tables sit beside ours, so our alembic keeps its revision in a table of its own and compares only
our tables when it autogenerates a revision.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlmodel import Session

from server.errors import NotFound

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "weightsmith_schema_version"
"""Where our alembic keeps its revision: alembic's default table, `alembic_version`, is Optuna's."""
MIGRATION_LOCK_KEY = 0x7765_6967_6874  # "weight": the PostgreSQL advisory lock `migrate` holds
SQLITE_BUSY_TIMEOUT_S = 30
LEGACY_VERSION_TABLE = "alembic_version"
"""Where stores made before the studies moved into this database keep our revision."""


def make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # pysqlite's own implicit BEGIN is deferred and cannot be made IMMEDIATE; we emit BEGIN.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _switch_to_wal(cursor: sqlite3.Cursor) -> None:
    """Put the file in WAL mode (a no-op once it is). Switching a fresh file needs an exclusive lock,
    and SQLite answers "database is locked" at once, without waiting out the busy timeout, when other
    connections hold the file too: service processes starting together on an empty store lost
    their start this way. So wait here, as the busy timeout would."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    pause = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def without_password(url: str) -> str:
    """A database URL as it may be stored or shown: its password, if any, as ***."""
    return make_url(url).render_as_string(hide_password=True)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Session]:
    """A session whose transaction holds SQLite's write lock from its first statement.

    Commits on success, rolls back on any exception. On PostgreSQL callers lock rows themselves.
    """
    with Session(engine, expire_on_commit=False) as session:
        if is_sqlite(engine):
            session.connection(execution_options={"sqlite_immediate": True})
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; a user's store survives upgrades this way.

    One transaction, under a lock taken at its start so that processes starting at once migrate one
    after the other (SQLite's write lock; on PostgreSQL a transaction-level advisory lock, since its
    DDL takes no lock that would keep two upgrades from both creating the same table): an older
    store's revision is adopted, then the schema upgraded.
    """
    config = alembic_config()
    with engine.connect().execution_options(sqlite_immediate=True) as connection, connection.begin():
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        _adopt_legacy_revision(connection, ScriptDirectory.from_config(config))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _adopt_legacy_revision(connection: Connection, script: ScriptDirectory) -> None:
    """Move our revision from `alembic_version` to our own table, and drop `alembic_version` if
    nothing else is left in it. A revision there that is not ours is Optuna's, and stays."""
    ours = {revision.revision for revision in script.walk_revisions()}
    heads = [head for head in MigrationContext.configure(connection).get_current_heads() if head in ours]
    if not heads:
        return
    adopted = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    for head in heads:
        adopted.stamp(script, head)
    legacy = Table(LEGACY_VERSION_TABLE, MetaData(), Column("version_num", String(32), primary_key=True))
    connection.execute(legacy.delete().where(legacy.c.version_num.in_(heads)))
    if connection.execute(select(func.count()).select_from(legacy)).scalar_one() == 0:
        legacy.drop(connection)


def is_ours(name: str | None, type_: str, _parent_names: object) -> bool:
    """alembic's `include_name`: autogenerate compares our tables only. Optuna's (and its
    `alembic_version`) are not in our models, and a revision must never propose dropping them."""
    return type_ != "table" or name not in _optuna_tables()


@functools.cache
def _optuna_tables() -> frozenset[str]:
    # Optuna names its tables only in this private module. Imported when autogenerate asks, not
    # at every start-up.
    from optuna.storages._rdb.models import BaseModel

    return frozenset(BaseModel.metadata.tables) | {LEGACY_VERSION_TABLE}


_LISTED_BY = {"job": "list_jobs", "dataset": "list_datasets", "model": "list_models",
              "evalsuite": "list_eval_suites", "evalreport": "read_eval_report with a model or job id"}


def owned(session: Session, table: type[T], object_id: str, agent_id: str, param: str) -> T:
    """The agent's own row, or NotFound: another agent's object is "not found", never "forbidden",
    so its existence is not disclosed."""
    row = session.get(table, object_id)
    if row is None or row.agent_id != agent_id:  # type: ignore[attr-defined]
        noun = table.__tablename__  # type: ignore[attr-defined]
        raise NotFound(f"no {noun} {object_id!r}; {_LISTED_BY.get(noun, 'the list tools')} shows yours",
                       param=param)
    return row
