"""Nodes that read their table from a database: a real throwaway PostgreSQL cluster
(initdb + pg_ctl in a temp dir, on a free port, stopped after), and a SQLite file."""

import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from fedtrain.cli.client import CoordinatorClient
from fedtrain.data import DataCheck, read_arrow
from fedtrain.demos.launch import LocalConsortium
from fedtrain.errors import DataSourceError, SpecError
from fedtrain.models import load_dataset
from fedtrain.policy import NodePolicy
from fedtrain.sources import DatabaseSource, fingerprint, parse_source

from conftest import FEATURES, make_spec
from test_end_to_end import cli, wait_for, write_policy
from test_hostile_coordinator import Live, headers

LABEL = "malignant"
READER_PASSWORD = "pw-q7x-never-logged"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The directory of initdb and pg_ctl: on PATH, or where Debian's package puts them."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((d for d in candidates if (d / "initdb").exists() and (d / "pg_ctl").exists()), None)


class Postgres:
    """A cluster of its own in a temp dir; as root (initdb refuses root) it runs as nobody."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="fedtrain-pg-"))
        self.as_user = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "nobody")
            self.as_user = ["runuser", "-u", "nobody", "--"]
        self.port = free_port()
        # The test's superuser comes in by the socket; nodes log in over TCP with a password.
        self._run("initdb", "-D", self.root / "data", "--auth-local=trust", "--auth-host=scram-sha-256",
                  "-U", "postgres", "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", self.root / "data", "-l", self.root / "log", "-w", "start",
                  "-o", f"-k {self.root} -h 127.0.0.1 -p {self.port} -F")
        self.admin = sa.create_engine(sa.URL.create("postgresql+psycopg", "postgres", database="postgres", query={
            "host": str(self.root), "port": str(self.port)}), poolclass=sa.pool.NullPool)
        with self.admin.begin() as db:  # the role the README tells owners to use: SELECT only
            db.execute(sa.text(f"CREATE ROLE reader LOGIN PASSWORD '{READER_PASSWORD}'"))
            db.execute(sa.text("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO reader"))

    def _run(self, tool, *args):
        subprocess.run([*self.as_user, self.bindir / tool, *map(str, args)], check=True, capture_output=True,
                       timeout=120)

    def url(self, password: str | None = READER_PASSWORD) -> str:
        """The reader's URL, over TCP."""
        return sa.URL.create("postgresql+psycopg", "reader", password, "127.0.0.1", self.port,
                             "postgres").render_as_string(hide_password=False)

    def load(self, name: str, csv: Path, **extra: str) -> None:
        """A table ``name`` with ``csv``'s rows, and ``extra`` text columns holding their value in every row."""
        rows = read_arrow(csv).to_pylist()
        columns = [sa.Column(c, sa.Integer if c == LABEL else sa.Float) for c in rows[0]]
        table = sa.Table(name, sa.MetaData(), *columns, *(sa.Column(c, sa.Text) for c in extra))
        with self.admin.begin() as db:
            table.create(db)
            db.execute(table.insert(), [{**r, **extra} for r in rows])

    def count(self, name: str) -> int:
        with self.admin.connect() as db:
            return db.execute(sa.text(f'SELECT count(*) FROM "{name}"')).scalar()

    def stop(self):
        self.admin.dispose()
        self._run("pg_ctl", "-D", self.root / "data", "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql (.ci/run does)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: initdb cannot run as an unprivileged user")
    server = Postgres(bindir)
    yield server
    server.stop()


def tensors(source, spec, check=None):
    return [t.numpy() for t in load_dataset(source, spec, check).tensors]


def test_the_data_option_is_a_file_or_a_database_url_with_a_table_or_a_query(tmp_path, shards):
    (shard, *_), _ = shards
    assert parse_source(str(shard)) == shard
    url = "postgresql+psycopg://reader:pw-q7x@db.example.org/clinic"
    source = parse_source(url, table="patients")
    assert str(source) == "postgresql+psycopg://reader:***@db.example.org/clinic, table patients"
    assert "pw-q7x" not in repr(source)
    for args, problem in [((url,), r"either a table \(--data-table\) or a query"),
                          ((url, "patients", "SELECT 1"), r"either a table \(--data-table\) or a query"),
                          ((str(shard), "patients"), "go with a database URL"),
                          ((str(tmp_path / "nope.csv"),), "does not exist"),
                          (("postgresql://reader:pw-q7x@db:port/clinic", "t"), "not a database URL")]:
        with pytest.raises(DataSourceError, match=problem) as raised:
            parse_source(*args)
        assert "pw-q7x" not in str(raised.value)


def test_a_sqlite_table_reads_as_its_csv_does_and_cannot_be_written(tmp_path, shards):
    (shard, *_), _ = shards
    spec = make_spec()
    db = tmp_path / "clinic.db"
    with sqlite3.connect(db) as conn:
        rows = read_arrow(shard).to_pylist()
        conn.execute(f"CREATE TABLE shard ({', '.join(repr(c) for c in rows[0])})")
        conn.executemany(f"INSERT INTO shard VALUES ({', '.join('?' * len(rows[0]))})",
                         [list(r.values()) for r in rows])
    url = f"sqlite:///{db}"
    for a, b in zip(tensors(shard, spec), tensors(DatabaseSource(url=url, table="shard"), spec)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(DataSourceError, match="readonly database"):
        DatabaseSource(url=url, query="DELETE FROM shard RETURNING *").read_columns(FEATURES)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM shard").fetchone() == (len(rows),)


def test_a_postgres_table_or_query_reads_as_its_file_does(postgres, shards, caplog):
    caplog.set_level("INFO")
    (shard, *_), _ = shards
    postgres.load("shard_a", shard)
    spec = make_spec()
    from_file = tensors(shard, spec)
    table = DatabaseSource(url=postgres.url(), table="public.shard_a")
    query = DatabaseSource(url=postgres.url(), query='SELECT * FROM shard_a ORDER BY "mean radius" DESC')
    for source in (table, query):
        # The same rows, whatever their order: as a set, the same training data.
        got = tensors(source, spec)
        order = np.lexsort(got[0].T), np.lexsort(from_file[0].T)
        np.testing.assert_array_equal(got[0][order[0]], from_file[0][order[1]])
        np.testing.assert_array_equal(got[1][order[0]], from_file[1][order[1]])
    # The data version is a fingerprint of the rows, not of their order, and changes with them.
    versions = {fingerprint(s.read_columns([*FEATURES, LABEL])) for s in (table, query)}
    assert len(versions) == 1
    fewer = DatabaseSource(url=postgres.url(), query='SELECT * FROM shard_a WHERE "mean radius" < 15')
    assert fingerprint(fewer.read_columns([*FEATURES, LABEL])) not in versions
    assert f"data version {versions.pop()}" in caplog.text and READER_PASSWORD not in caplog.text


def test_a_query_that_writes_fails_and_the_table_is_unchanged(postgres, shards):
    (shard, *_), _ = shards
    postgres.load("shard_w", shard)
    with postgres.admin.begin() as db:  # a function the reader may call, that writes
        db.execute(sa.text('CREATE FUNCTION sneaky() RETURNS int AS $$ DELETE FROM shard_w; SELECT 1 $$ LANGUAGE sql'
                           ' SECURITY DEFINER'))
    before = postgres.count("shard_w")
    for query in ["WITH gone AS (DELETE FROM shard_w RETURNING *) SELECT * FROM gone",
                  "SELECT sneaky() AS malignant",
                  "SELECT 1 AS malignant; COMMIT; DELETE FROM shard_w"]:
        with pytest.raises(DataSourceError, match="read-only transaction"):
            DatabaseSource(url=postgres.url(), query=query).read_columns([LABEL])
    assert postgres.count("shard_w") == before


def test_a_failing_query_a_missing_column_and_a_refused_connection_are_named_locally(postgres, shards):
    (shard, *_), _ = shards
    postgres.load("shard_e", shard, note="CANARY-note")
    spec = make_spec()
    closed = free_port()  # nothing listens there
    cases = {
        "invalid input syntax for type double precision: \"CANARY-note\"":
            DatabaseSource(url=postgres.url(), query=f'SELECT note::float AS "{FEATURES[0]}", * FROM shard_e'),
        r"missing column\(s\) \['mean radius', 'mean smoothness', 'worst area'\]; the result has \['mean texture',"
        r" 'malignant'\]":
            DatabaseSource(url=postgres.url(), query='SELECT "mean texture", malignant FROM shard_e'),
        "relation \"no_such_table\" does not exist": DatabaseSource(url=postgres.url(), table="no_such_table"),
        "password authentication failed": DatabaseSource(url=postgres.url("wrong-pw-q7x"), table="shard_e"),
        f"port {closed} failed: Connection refused": DatabaseSource(
            url=postgres.url().replace(f":{postgres.port}/", f":{closed}/"), table="shard_e"),
    }
    for problem, source in cases.items():
        with pytest.raises(SpecError, match=problem) as raised:  # strict reading: the error
            load_dataset(source, spec)
        assert READER_PASSWORD not in str(raised.value) and "wrong-pw-q7x" not in str(raised.value)
        check = DataCheck()  # a node reading its own data: no rows, and the note for its owner
        assert len(load_dataset(source, spec, check)) == 0 and check.count == 1
        assert str(raised.value) in check.summary()


def test_what_a_node_sends_is_the_same_whether_its_database_answers_or_not(tmp_path, postgres, shards, caplog):
    """Real node agents against a real coordinator: one reads its table, the others meet a
    failing query, a missing column, a refused connection, or have no data at all. They all
    say the same things, and nothing from the database leaves; the owner's log has the why."""
    caplog.set_level(logging.INFO)
    (shard, *_), _ = shards
    canary, table = "CANARY-q9-ward-note", "ward_q9_secret"
    postgres.load(table, shard, note=canary)
    closed = free_port()  # nothing listens there
    url = postgres.url()
    sources = {
        "reads": DatabaseSource(url=url, table=table),
        "query fails": DatabaseSource(url=url, query=f'SELECT note::float AS "{FEATURES[0]}", * FROM {table}'),
        "column missing": DatabaseSource(url=url, query=f"SELECT note, malignant FROM {table}"),
        "refused": DatabaseSource(url=url.replace(f":{postgres.port}/", f":{closed}/"), table=table),
        "no data": tmp_path / "missing.csv",
    }
    policy = NodePolicy(max_epsilon=10.0, dataset_size=150)
    live = Live(tmp_path / "coordinator")
    try:
        agents = {what: live.start(data=source, policy=policy, state_dir=tmp_path / f"node-{i}", name=f"n{i}")
                  for i, (what, source) in enumerate(sources.items())}
        with CoordinatorClient(live.address) as client:
            job_id = client.submit(make_spec(min_nodes=len(sources), training={"rounds": 1}, round_timeout=60,
                                               secure_aggregation=False))
            status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"), timeout=120)
        time.sleep(0.5)  # the last messages are in the capture
    finally:
        live.stop()
    assert status.state == "finished"
    said = {what: headers(agent, job_id) for what, agent in agents.items()}
    assert said["no data"] and all(s == said["no data"] for s in said.values()), said
    assert not [h for h in said["no data"] if h[0] == "result" and h[1]]  # no refusal: a noise-only update
    for agent in agents.values():
        for method, raw in agent.capture.sent:
            for secret in (canary, table, "note::float", READER_PASSWORD, "reader"):
                assert secret.encode() not in raw, (method, secret)
    node_log = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("fedtrain."))
    for why in (f'invalid input syntax for type double precision: "{canary}"', "missing column(s) ['mean radius'",
                f"port {closed} failed: Connection refused", "data version sha256:"):
        assert why in node_log, why
    assert READER_PASSWORD not in caplog.text


@pytest.mark.slow
def test_a_job_runs_on_nodes_that_read_postgres(tmp_path, postgres, shards):
    """`fedtrain node start --data postgresql://...` processes, two reading a table and one a
    query, the password in PGPASSWORD: the job finishes, and each node logs its data version."""
    paths, test = shards
    for i, shard in enumerate(paths):
        postgres.load(f"e2e_shard_{i}", shard)
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=5.0)
    url = postgres.url(password=None)
    config = [{"FEDTRAIN_DATA_TABLE": "e2e_shard_0"}, {"FEDTRAIN_DATA_TABLE": "e2e_shard_1"},
              {"FEDTRAIN_DATA_QUERY": 'SELECT * FROM e2e_shard_2 WHERE "mean radius" > 0'}]
    with LocalConsortium(tmp_path / "run", poll_seconds=1, eval_dir=tmp_path) as c:
        c.start_coordinator()
        for i, env in enumerate(config):
            c.start_node(f"n{i}", url, policy, env={**env, "PGPASSWORD": READER_PASSWORD})
        with c.client() as client:
            job_id = client.submit(make_spec(min_nodes=3, evaluation={"data": str(test)}))
            status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"))
            assert status.state == "finished", status
    assert [sorted(n.name for n in r.nodes) for r in status.rounds[1:]] == [["n0", "n1", "n2"]] * 2
    for i, shard in enumerate(paths):
        log = (c.logs / f"node-n{i}.log").read_text()
        rows = read_arrow(shard).num_rows
        assert f"read {rows} row(s) from postgresql+psycopg://reader@127.0.0.1:{postgres.port}/postgres" in log
        assert "training loss" in log and f"on {rows} row(s)" in log and "data version sha256:" in log
        assert READER_PASSWORD not in log


def test_node_start_names_a_database_source_without_its_table_and_never_prints_the_password(tmp_path):
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=5.0)
    proc = cli("node", "start", "--coordinator", "127.0.0.1:1", "--insecure", "--policy", str(policy),
               "--state-dir", str(tmp_path / "state"), "--data", "postgresql://reader:pw-q7x@db/clinic", check=False)
    assert proc.returncode == 2 and "either a table (--data-table) or a query" in proc.stderr
    assert "pw-q7x" not in proc.stdout + proc.stderr
    assert "CSV, JSONL or Parquet file, or a database URL" in " ".join(cli("node", "start", "--help").stdout.split())
