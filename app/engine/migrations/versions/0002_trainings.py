"""Training jobs beside dataset jobs: a job's kind, and its progress while it runs.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("kind", sa.String(16), nullable=False, server_default="dataset"))
    op.add_column("jobs", sa.Column("progress", sa.Text(), nullable=True))
    op.create_index("jobs_kind_state_created", "jobs", ["kind", "state", "created_at"])


def downgrade() -> None:
    op.drop_index("jobs_kind_state_created", "jobs")
    op.drop_column("jobs", "progress")
    op.drop_column("jobs", "kind")
