"""The jobs database: its table for queries, engines for SQLite (the embedded default) and PostgreSQL, and the
schema's version (Alembic migrations in `app/engine/migrations`), checked before a server or worker uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from app.errors import SchemaError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
metadata = sa.MetaData()
JOBS = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(32), primary_key=True), sa.Column("model", sa.String(128)),
    sa.Column("request", sa.Text), sa.Column("state", sa.String(16)), sa.Column("done", sa.BigInteger),
    sa.Column("total", sa.BigInteger), sa.Column("error", sa.Text), sa.Column("created_at", sa.Float),
    sa.Column("started_at", sa.Float), sa.Column("finished_at", sa.Float), sa.Column("result_bytes", sa.BigInteger),
    sa.Column("format", sa.String(16)), sa.Column("heartbeat_at", sa.Float), sa.Column("owner", sa.String(128)),
    sa.Column("reserved_bytes", sa.BigInteger), sa.Column("replica", sa.String(128)),
    sa.Column("lease_until", sa.Float), sa.Column("attempts", sa.Integer), sa.Column("checkpoint", sa.Text),
    sa.Column("kind", sa.String(16)), sa.Column("progress", sa.Text),
)


def database_url(configured: str | None, data_dir: Path) -> str:
    """The jobs database: the setting, else SQLite in the data directory (the single-host default)."""
    return configured or f"sqlite:///{data_dir / 'jobs.sqlite3'}"


def create_engine(url: str) -> sa.Engine:
    """An engine; SQLite in WAL mode with a busy timeout (several processes on one host may share the file),
    PostgreSQL through psycopg 3 (`postgresql://` URLs)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _connect(connection: Any, _record: Any) -> None:  # a DB-API connection
        connection.isolation_level = None  # the driver's own BEGIN is deferred: SQLAlchemy's begin below replaces it
        connection.execute("PRAGMA journal_mode=WAL")

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # transactions that read then write cannot interleave

    return engine


def _config(engine: sa.Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def upgrade(engine: sa.Engine) -> None:
    """Bring the schema to this version's head (`synthgen db upgrade`)."""
    with engine.begin() as connection:
        config = _config(engine)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def check(engine: sa.Engine, auto_upgrade: bool) -> None:
    """Refuse a schema this version does not know; upgrade an older one if `auto_upgrade` (the embedded SQLite
    default), else say how to."""
    script = ScriptDirectory.from_config(_config(engine))
    head = script.get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == head:
        return
    known = {revision.revision for revision in script.walk_revisions()}
    if current is not None and current not in known:
        raise SchemaError(f"the jobs database is at schema revision {current}, which this synthgen does not know "
                          "(written by a newer version?); run the matching version")
    if not auto_upgrade:
        raise SchemaError(f"the jobs database is at schema revision {current or 'none'}, this synthgen needs {head}: "
                          "run `synthgen db upgrade` first")
    upgrade(engine)
