"""tune job rows: the studies database URL without its password

Revision ID: 0007
Revises: 0006

Tune jobs admitted before 2026-11-27 stored the studies database URL, password and all, in
`job.resolved`, which the job tools show to agents. The driver now connects with the service's own
URL and compares only the masked form, so the stored one can lose its password.
"""

import sqlalchemy as sa
from alembic import op

from server.store.db import without_password

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_job = sa.table("job", sa.column("id", sa.String), sa.column("kind", sa.String), sa.column("resolved", sa.JSON))


def upgrade() -> None:
    connection = op.get_bind()
    for job_id, resolved in connection.execute(sa.select(_job.c.id, _job.c.resolved).where(_job.c.kind == "tune")):
        url = (resolved or {}).get("studies_url")
        if url and without_password(url) != url:
            connection.execute(_job.update().where(_job.c.id == job_id)
                               .values(resolved={**resolved, "studies_url": without_password(url)}))


def downgrade() -> None:
    pass  # the password is gone; the driver never needed it from the row
