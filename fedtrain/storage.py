"""The files that coordinator and nodes keep their durable state in: SQLite databases,
private directories and private files.

State is readable by its owner only (directories 0700, files 0600): it holds who took
part in which job, the budget each node has spent, and signing keys.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

# SQLite gives its -wal, -shm and -journal files the database file's permissions.
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter, created if missing (missing parents
    get the umask's mode)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:  # one an earlier version created with the umask's mode
        path.chmod(0o700)
    return path


def restrict(path: Path) -> None:
    """Make an existing file readable and writable by its owner only."""
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except FileNotFoundError:
        pass


def private_file(path: Path) -> Path:
    """``path`` as a file only its owner can read, created empty if missing."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    restrict(path)
    return path


def write_private(path: Path, data: bytes, fsync: bool = True) -> None:
    """Replace ``path`` atomically with ``data``, readable by its owner only, whatever the old
    file's mode: readers see the old or the new content, never a mix or a readable key."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_db(path: str | Path, schema: str, added_columns: tuple[tuple[str, str, str], ...] = (),
            full_sync: bool = False) -> sqlite3.Connection:
    """An autocommit connection in WAL mode, shared across threads, with ``schema`` applied.

    ``added_columns`` are ``(table, column, declaration)`` introduced after a table's first
    release: a file written by an older version gains them, and nothing in it is rewritten.
    ``full_sync``: a commit survives power loss, not only a crash of the process.
    The file and its side files are readable by their owner only.
    """
    path = private_file(Path(path))
    for suffix in _SQLITE_SIDE_FILES:
        restrict(path.with_name(path.name + suffix))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
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
