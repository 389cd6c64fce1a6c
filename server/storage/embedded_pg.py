"""The zero-setup default: a private PostgreSQL (pgserver) when no database URL is set."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger("herald.embedded_pg")

DATABASE = "herald"


class EmbeddedPostgres:
    """A PostgreSQL server living in data_dir, reached over a Unix socket only.

    It is stopped by stop() or, failing that, at interpreter exit (pgserver's atexit).
    """

    def __init__(self, data_dir: str | Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI).
            warnings.simplefilter("ignore")
            import pgserver
            from pgserver import _commands

        self._commands = _commands
        path = Path(data_dir).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._server: Any = pgserver.get_server(path, cleanup_mode="stop")
        self.data_dir = path

    def url(self, database: str = DATABASE) -> str:
        return self._server.get_uri(database)

    async def ensure_database(self, database: str = DATABASE) -> str:
        conn = await asyncpg.connect(self.url("postgres"))
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{database}"')
        finally:
            await conn.close()
        return self.url(database)

    def pg_ctl(self, *args: str) -> None:
        """Run pg_ctl on this cluster (as pgserver's system user when we are root)."""
        self._commands.pg_ctl(list(args), pgdata=self.data_dir, user=self._server.system_user, timeout=60)

    def stop(self) -> None:
        self._server.cleanup()


def mask_url(url: str) -> str:
    """The URL with any password (in the authority or the query) replaced, for logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = re.sub(r"(?i)(^|&)(password|sslpassword)=[^&]*", r"\1\2=***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # urlunsplit would drop the empty authority of postgresql:///db
    return urlunsplit(parts._replace(netloc=netloc, query=query))
