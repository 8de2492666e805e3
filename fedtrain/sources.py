"""Where a node's table lives: a local file, or a database that the node queries itself.

The table or query is the owner's configuration (``fedtrain node start --data URL
--data-table NAME`` or ``--data-query SQL``), never the job's: a coordinator sends the
columns it wants, never SQL. A query's result maps to the job's columns by name, as a
file's header does. The query runs in a read-only transaction; the role it connects as
should be able to SELECT and nothing else (README, "Data from a database").
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, field_validator, model_validator

from fedtrain.errors import DataSourceError

log = logging.getLogger("fedtrain.data")

# Read-only for the whole session where the database allows it, so that not even a COMMIT
# inside the owner's query starts a transaction that can write; elsewhere the SQL
# standard's statement, for the one transaction.
_READ_ONLY_SESSION = {
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "sqlite": "PRAGMA query_only = ON",
}


class DatabaseSource(BaseModel):
    """A SQLAlchemy URL and the table or query that gives the node's rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: SecretStr  # may hold a password: never printed (see __str__)
    table: str | None = None  # NAME or SCHEMA.NAME
    query: str | None = None

    @field_validator("url")
    @classmethod
    def _a_url(cls, url: SecretStr) -> SecretStr:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(url.get_secret_value())
        except (ArgumentError, ValueError):  # their messages repeat the URL, password included
            raise ValueError("not a database URL (dialect+driver://user@host:port/database)") from None
        return url

    @model_validator(mode="after")
    def _one_of_table_or_query(self) -> DatabaseSource:
        if (self.table is None) == (self.query is None):
            raise ValueError("give a database source either a table (--data-table) or a query (--data-query)")
        return self

    def __str__(self) -> str:
        from sqlalchemy.engine import make_url

        where = f"table {self.table}" if self.table else "its query"
        return f"{make_url(self.url.get_secret_value()).render_as_string(hide_password=True)}, {where}"

    def _statement(self):
        from sqlalchemy import literal_column, select, table, text

        if self.query is not None:
            return text(self.query.replace(":", r"\:"))  # no bind parameters: every colon is SQL's
        schema, _, name = self.table.rpartition(".")
        return select(literal_column("*")).select_from(table(name, schema=schema or None))

    def read_columns(self, columns: list[str]) -> dict[str, list]:
        """``columns`` of the query's result, read in a read-only transaction."""
        from sqlalchemy import create_engine
        from sqlalchemy.exc import SQLAlchemyError
        from sqlalchemy.pool import NullPool

        try:
            engine = create_engine(self.url.get_secret_value(), poolclass=NullPool)
        except (SQLAlchemyError, ImportError) as err:  # ImportError: the dialect's driver is not installed
            raise DataSourceError(f"{self}: cannot use this database URL: {err}") from None
        try:
            with engine.connect() as conn:  # closed without a commit: rolled back
                session = _READ_ONLY_SESSION.get(conn.dialect.name)
                conn.exec_driver_sql(session or "SET TRANSACTION READ ONLY")
                if session:
                    conn.commit()  # a session setting, kept by every transaction after this one
                result = conn.execute(self._statement())
                header = list(result.keys())
                missing = [c for c in columns if c not in header]
                if missing:
                    raise DataSourceError(f"{self}: missing column(s) {missing}; the result has {header}")
                rows = result.all()
        except SQLAlchemyError as err:
            # The driver's own words (e.g. "Connection refused", "relation ... does not exist"),
            # without SQLAlchemy's echo of the statement.
            reason = " ".join(str(getattr(err, "orig", None) or err).split())
            raise DataSourceError(f"{self}: {reason}") from None
        finally:
            engine.dispose()
        picked = {c: [row[header.index(c)] for row in rows] for c in columns}
        log.info("read %d row(s) from %s: data version %s", len(rows), self, fingerprint(picked))
        return picked


def fingerprint(columns: dict[str, list]) -> str:
    """A stable version of the rows read: sha256 over the column names and the rows as a
    multiset, since rows come in no set order from a query without ORDER BY."""
    rows = sorted(hashlib.sha256(json.dumps(row, default=str).encode()).digest() for row in zip(*columns.values()))
    digest = hashlib.sha256(json.dumps(list(columns)).encode())
    for row in rows:
        digest.update(row)
    return "sha256:" + digest.hexdigest()


DataSource = Path | DatabaseSource


def parse_source(data: str, table: str | None = None, query: str | None = None) -> DataSource:
    """The node's ``--data``: a database URL (with a table or a query), or an existing file."""
    if "://" not in data:
        if table is not None or query is not None:
            raise DataSourceError("--data-table and --data-query go with a database URL in --data, not a file")
        if not Path(data).is_file():
            raise DataSourceError(f"data file {data} does not exist")
        return Path(data)
    try:
        return DatabaseSource(url=data, table=table, query=query)
    except ValidationError as err:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise DataSourceError(f"--data: {problems}") from None
