"""The store: migrations match the models, run idempotently, and keep data across upgrades."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from server import auth
from server.db import make_engine, migrate
from server.settings import Settings


def test_migrations_create_exactly_the_models_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'ws.db'}")
    migrate(engine)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert diff == [], f"models changed without a migration: {diff}"


def test_migrating_again_keeps_stored_agents(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    engine = make_engine(settings.db_url)
    migrate(engine)
    agent, key = auth.create_agent(engine, settings, "keeper")
    migrate(engine)
    assert auth.agent_for_key(engine, key).id == agent.id


def test_sqlite_store_runs_in_wal_mode(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'ws.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
