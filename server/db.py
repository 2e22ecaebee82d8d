"""The database: engine set-up, migrations, and the one write transaction admission needs.

SQLite (the default) runs in WAL mode so readers never wait on the writer; transactions that
read-then-write a budget use `BEGIN IMMEDIATE`, which takes the write lock at the start instead of
at the first write, so two admissions can never both read the same spare budget. On PostgreSQL
the same transactions lock the agent's row (`SELECT ... FOR UPDATE`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlmodel import Session

from server.errors import NotFound

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # pysqlite's own implicit BEGIN is deferred and cannot be made IMMEDIATE; we emit BEGIN.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


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


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; a user's store survives upgrades this way."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


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
