"""Alembic environment: runs on the connection `server.store.db.migrate` hands it.

New revision after a change to server/store/tables.py:
    WEIGHTSMITH_HOME=/tmp/ws-migrate .venv/bin/alembic -c server/store/alembic.ini revision --autogenerate -m "..."

Our revision is kept in `weightsmith_schema_version`, and autogenerate compares our tables only:
the Optuna studies share the database, with their own tables and their own `alembic_version`.
"""

from alembic import context
from sqlmodel import SQLModel

import server.store.tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from server.store.db import VERSION_TABLE, is_ours

target_metadata = SQLModel.metadata
connection = context.config.attributes.get("connection")

if connection is None:
    # Command-line use (`alembic -c server/store/alembic.ini ...`): connect with the service settings.
    from server.settings import Settings
    from server.store.db import make_engine

    engine = make_engine(Settings().db_url)
    connection = engine.connect()

context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                  version_table=VERSION_TABLE, include_name=is_ours)
with context.begin_transaction():
    context.run_migrations()
