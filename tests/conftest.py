"""Fixtures every tier may use: a throwaway PostgreSQL server for the session (tests/support/pg.py)
and a new database per test. Without PostgreSQL they skip, except under CI=true, where that is a
failure (CI must run the PostgreSQL journal tests)."""

import os

import pytest

from support.pg import PgDatabase, PgServer, PgUnavailable


def _start_or_skip() -> PgServer:
    try:
        import psycopg  # noqa: F401

        return PgServer().start()
    except (PgUnavailable, ImportError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests cannot run under CI=true: {e}")
        pytest.skip(f"no PostgreSQL: {e}")


@pytest.fixture(scope="session")
def pg_server():
    server = _start_or_skip()
    yield server
    server.stop()


@pytest.fixture
def pg_db(pg_server):
    name = pg_server.database()
    yield PgDatabase(pg_server.url(name), str(pg_server.password_file), pg_server, name)
    pg_server.drop(name)
