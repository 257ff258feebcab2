"""A Prefect server on PostgreSQL, set up with the three steps of deploy/README.md (a role,
a database it owns, ``PREFECT_API_DATABASE_CONNECTION_URL``), and a segflow run against it.

The PostgreSQL cluster is a throw-away one in a temporary folder on a free port, made with
the machine's own ``initdb`` and ``pg_ctl``; nothing is installed. Skipped, saying why,
where PostgreSQL's server programs are missing (or the tests run as root and there is no
``postgres`` account to run them as: PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from _geodata import blob_image, write_geotiff
from _prefect_server import PrefectServer, Run

pytestmark = pytest.mark.slow

PASSWORD = "segflow-test"


def postgres_program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture
def postgres_port() -> Iterator[int]:
    """The port of a new PostgreSQL cluster on 127.0.0.1 (superuser ``postgres``)."""
    initdb, pg_ctl = postgres_program("initdb"), postgres_program("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed here")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="segflow-pg-"))
    if os.geteuid() == 0:  # initdb and postgres refuse root: run them as `postgres`
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.skip("tests run as root and there is no `postgres` account to run PostgreSQL")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    data = folder / "data"
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    try:
        subprocess.run(
            [*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"),
             "-w", "start"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        yield port
    finally:
        if data.exists():
            subprocess.run(
                [*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                capture_output=True, timeout=120,
            )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


def psql(port: int, sql: str, database: str = "postgres") -> str:
    """What ``sql`` prints, run by the superuser in ``database`` (rows only, unaligned)."""
    psql = postgres_program("psql")
    assert psql, "psql is not installed"
    command = [psql, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", database]
    done = subprocess.run(
        [*command, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_prefect_server_on_postgresql_runs_a_segflow_run(
    postgres_port: int, tmp_path: Path, dask_address: str
) -> None:
    # deploy/README.md, "PostgreSQL": a role, a database it owns, the connection URL.
    psql(postgres_port, f"CREATE ROLE prefect LOGIN PASSWORD '{PASSWORD}';")
    psql(postgres_port, "CREATE DATABASE prefect OWNER prefect;")
    url = f"postgresql+asyncpg://prefect:{PASSWORD}@127.0.0.1:{postgres_port}/prefect"
    (tmp_path / "home").mkdir()
    server = PrefectServer(tmp_path / "home", env={"PREFECT_API_DATABASE_CONNECTION_URL": url})
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    write_geotiff(tiles / "good.tif", blob_image())
    config = tmp_path / "pg.yaml"
    config.write_text(
        yaml.safe_dump({
            "name": "pg",
            "input": {"path": str(tiles)},
            "output": {"store": str(tmp_path / "out.zarr"), "chunks": [32, 32]},
            "blocks": {"shape": [32, 32]},
            "pipeline": [{"op": "threshold", "value": 100}, {"op": "label"}],
            "cluster": {"address": dask_address},
        })
    )  # fmt: skip
    try:
        if (why := server.start()) is not None:
            pytest.fail(why)  # PostgreSQL is here: a server that does not start is a failure
        run = Run(server, tmp_path, "pg", "segment", str(config))
        try:
            ended = run.finish()
        finally:
            run.stop()
    finally:
        server.stop()

    assert ended["type"] == "COMPLETED", run.text()[-3000:]
    assert "pg: 1 done" in ended["message"]
    # The run is in PostgreSQL's tables (the server used the URL, not a SQLite file).
    names = psql(postgres_port, "SELECT name FROM flow_run;", database="prefect").split()
    assert any(name.startswith("pg-") for name in names), names
    assert not list((tmp_path / "home").glob("*.db"))
