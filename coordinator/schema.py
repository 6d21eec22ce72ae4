"""The tables of `state.db` and how its SQLite connections are set up.

WAL mode with `synchronous=FULL`: a committed transaction survives a power cut. SQLAlchemy
emits BEGIN itself (plain, or BEGIN IMMEDIATE for writes, see `Store._write`), so that a
read-then-write in one transaction cannot interleave with another writer.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)

#: Execution option that makes a connection's transactions BEGIN IMMEDIATE.
IMMEDIATE = "lc_immediate"

metadata = MetaData()

volunteers = Table(
    "volunteers", metadata,
    Column("fingerprint", String(64), primary_key=True),
    Column("public_key", Text, nullable=True),  # unknown for a key banned before it was seen
    Column("display_name", Text, nullable=True),
    Column("registered", Boolean, nullable=False, default=False),
    Column("banned", Boolean, nullable=False, default=False),
    Column("first_seen", String(32), nullable=False),
    Column("rounds_contributed", Integer, nullable=False, default=0),
    Column("examples_contributed", Integer, nullable=False, default=0),
)

rounds = Table(
    "rounds", metadata,
    Column("round", Integer, primary_key=True),
    Column("started", String(32), nullable=False),
    Column("closed", String(32), nullable=True),
    Column("status", String(16), nullable=False),
    Column("nonce", String(128), nullable=False),
    Column("base_version", Integer, nullable=False),
    Column("base_adapter_digest", String(64), nullable=True),
    Column("adapter_digest", String(64), nullable=True),  # blob of the adapter this round produced
    Column("sampled", Integer, nullable=False, default=0),
    Column("admitted", Integer, nullable=False, default=0),
    Column("rejected", Integer, nullable=False, default=0),
    Column("train_loss", Float, nullable=True),
    Column("eval_loss", Float, nullable=True),
    Column("note", Text, nullable=False, default=""),
)

updates = Table(
    "updates", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("round", Integer, ForeignKey("rounds.round"), nullable=False, index=True),
    Column("fingerprint", String(64), nullable=True, index=True),  # None when unparseable
    Column("update_digest", String(64), nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("reason", String(64), nullable=False, default=""),  # a protocol.errors.Reason code
    Column("message", Text, nullable=False, default=""),
    Column("examples", Integer, nullable=False, default=0),
    Column("train_loss", Float, nullable=True),
    Column("bytes", Integer, nullable=False, default=0),
    Column("received", String(32), nullable=False),
    # async schedule: versions closed since the update's base (None under sync), and the blob of its
    # envelope while its version is open (resume folds it again from there)
    Column("staleness", Integer, nullable=True),
    Column("envelope_digest", String(64), nullable=True),
)

tasks = Table(  # async schedule: every task sent, so that any reply can be tied to its base
    "tasks", metadata,
    Column("nonce", String(128), primary_key=True),
    Column("serial", Integer, nullable=False, unique=True),  # the task's `round` field: unique, increasing
    Column("version", Integer, nullable=False),  # the version open when it was sent
    Column("base_version", Integer, nullable=False),  # the version it trains from (version - 1)
    Column("base_adapter_digest", String(64), nullable=False),
    Column("node_id", String(24), nullable=False),  # Flower's node ids are unsigned 64-bit
    Column("sent", String(32), nullable=False),
    Column("status", String(16), nullable=False),  # sent, used (an update admitted), expired
    Column("update_digest", String(64), nullable=True),
)

#: Columns added after a table was first released: `open_engine` adds them to an older state.db.
ADDED_COLUMNS = {"updates": ("staleness INTEGER", "envelope_digest VARCHAR(64)")}

releases = Table(
    "releases", metadata,
    Column("version", Integer, primary_key=True),
    Column("round", Integer, nullable=False),
    Column("manifest_digest", String(64), nullable=False, unique=True),
    Column("adapter_digest", String(64), nullable=True),
    Column("created", String(32), nullable=False),
    Column("path", Text, nullable=False),  # relative to the project folder
)


def open_engine(path: str) -> Engine:
    """An engine on the SQLite file at `path` with every table created."""
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    metadata.create_all(engine)
    _migrate(engine)
    return engine


def _migrate(engine: Engine) -> None:
    """Add the columns of ADDED_COLUMNS that a state.db made by an older release lacks."""
    with engine.connect().execution_options(**{IMMEDIATE: True}) as conn, conn.begin():
        for table, columns in ADDED_COLUMNS.items():
            have = {row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info({table})")}
            for column in columns:
                if column.split()[0] not in have:
                    conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column}")


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _on_begin); the driver must not open transactions.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _on_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(IMMEDIATE) else "BEGIN")
