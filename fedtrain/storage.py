"""Opening the SQLite files that coordinator and nodes keep their durable state in."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_db(path: str | Path, schema: str, added_columns: tuple[tuple[str, str, str], ...] = (),
            full_sync: bool = False) -> sqlite3.Connection:
    """An autocommit connection in WAL mode, shared across threads, with ``schema`` applied.

    ``added_columns`` are ``(table, column, declaration)`` introduced after a table's first
    release: a file written by an older version gains them, and nothing in it is rewritten.
    ``full_sync``: a commit survives power loss, not only a crash of the process.
    """
    db = sqlite3.connect(Path(path), isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA foreign_keys=ON")
    if full_sync:
        db.execute("PRAGMA synchronous=FULL")
    # Before the schema, whose indexes may name the added columns.
    for table, column, decl in added_columns:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if have and column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    db.executescript(schema)
    return db
