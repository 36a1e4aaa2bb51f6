"""The jobs table, with leases and checkpoints; a jobs table from before migrations gets the columns it lacks.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

COLUMNS = [
    ("model", sa.String(128), {"nullable": False}),
    ("request", sa.Text(), {"nullable": False}),
    ("state", sa.String(16), {"nullable": False}),
    ("done", sa.BigInteger(), {"nullable": False, "server_default": "0"}),
    ("total", sa.BigInteger(), {"nullable": False}),
    ("error", sa.Text(), {}),
    ("created_at", sa.Float(), {"nullable": False}),
    ("started_at", sa.Float(), {}),
    ("finished_at", sa.Float(), {}),
    ("result_bytes", sa.BigInteger(), {}),
    ("format", sa.String(16), {"nullable": False}),
    ("heartbeat_at", sa.Float(), {}),
    ("owner", sa.String(128), {"nullable": False, "server_default": ""}),
    ("reserved_bytes", sa.BigInteger(), {"nullable": False, "server_default": "0"}),
    ("replica", sa.String(128), {"nullable": False, "server_default": ""}),
    ("lease_until", sa.Float(), {}),
    ("attempts", sa.Integer(), {"nullable": False, "server_default": "0"}),
    ("checkpoint", sa.Text(), {}),
]


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "jobs" not in inspector.get_table_names():
        op.create_table("jobs", sa.Column("id", sa.String(32), primary_key=True),
                        *(sa.Column(name, kind, **options) for name, kind, options in COLUMNS))
        indexes: set[str] = set()
    else:  # a SQLite database from before migrations
        present = {column["name"] for column in inspector.get_columns("jobs")}
        for name, kind, options in COLUMNS:
            if name not in present:
                op.add_column("jobs", sa.Column(name, kind, **{**options, "nullable": True}))
        indexes = {index["name"] for index in inspector.get_indexes("jobs")}
    if "jobs_state_created" not in indexes:
        op.create_index("jobs_state_created", "jobs", ["state", "created_at"])
    if "jobs_owner_created" not in indexes:
        op.create_index("jobs_owner_created", "jobs", ["owner", "created_at"])


def downgrade() -> None:
    op.drop_table("jobs")
