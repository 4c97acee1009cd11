"""The controller's store on PostgreSQL (controller setting `store_url`), for a
standby controller: the Store's SQL is portable (`?` placeholders, no SQLite
functions), so this is only the slice of sqlite3.Connection the Store uses, over
psycopg2, plus the leader lease.

The lease is a PostgreSQL session-level advisory lock (`pg_try_advisory_lock`): held
as long as the holder's connection lives, so a leader that dies (kill -9, a machine
gone) releases it with its connection, and nothing has to expire. A standby asks
every LEASE_POLL seconds; the leader checks its connection every heartbeat and steps
down (exits, for its supervisor to start it again as a standby) when it is gone.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg2
import psycopg2.extensions

log = logging.getLogger(__name__)

LEASE_KEY = 0x6265727468        # "berth": the advisory lock every controller asks for
LEASE_POLL = 0.2                # seconds between a standby's attempts


class PgConnection:
    """What the Store calls on its connection: execute(sql, args) -> .fetchall(),
    and in_transaction. Autocommit, so the Store's own BEGIN/COMMIT frame its
    transactions as they do on SQLite."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg2.connect(url, connect_timeout=5)
        self.conn.autocommit = True

    @property
    def in_transaction(self) -> bool:
        return self.conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE

    def execute(self, sql: str, args: Any = ()) -> _Result:
        cur = self.conn.cursor()
        cur.execute(sql.replace("?", "%s"), tuple(args))
        return _Result(cur)


class _Result:
    def __init__(self, cur: Any) -> None:
        self.cur = cur

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows = self.cur.fetchall() if self.cur.description is not None else []
        self.cur.close()
        return [tuple(r) for r in rows]


class LeaderLease:
    """Only the holder of the lease acts as the controller."""

    def __init__(self, url: str, holder: str) -> None:
        self.url = url
        self.holder = holder
        self.conn: Any = None
        self.acquired_at = 0.0

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Wait for the lease (a standby waits here). False when stopped first."""
        said = False
        while stop is None or not stop.is_set():
            try:
                if self.conn is None:
                    self.conn = psycopg2.connect(self.url, connect_timeout=5,
                                                 application_name=f"berth {self.holder}")
                    self.conn.autocommit = True
                with self.conn.cursor() as cur:
                    cur.execute("SELECT pg_try_advisory_lock(%s)", (LEASE_KEY,))
                    if cur.fetchone()[0]:
                        self.acquired_at = time.monotonic()
                        log.info("leader lease acquired", extra={"holder": self.holder})
                        return True
            except psycopg2.Error as exc:
                log.warning("the store for the leader lease is unreachable: %s", exc)
                self.close()
            if not said:
                log.info("standby: another controller holds the leader lease; waiting "
                         "to take over", extra={"holder": self.holder})
                said = True
            time.sleep(LEASE_POLL)
        return False

    def held(self) -> bool:
        """Whether the lease's connection still lives (the lease with it)."""
        if self.conn is None:
            return False
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT 1")
            return True
        except psycopg2.Error:
            self.close()
            return False

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg2.Error:
                pass
            self.conn = None
