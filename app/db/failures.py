"""What a database error means: the database refused a value, or it cannot be reached.

Shared by the web's error handler (a refusal is the request's fault, 400; an outage is a 503)
and by group commit (`app.db.group`: a refusal fails only the unit that made it; an outage
fails every unit of the group at once).
"""

from __future__ import annotations

import sqlite3
import sys

from tortoise.exceptions import BaseORMException, DBConnectionError, IntegrityError, ValidationError


def asyncpg_errors() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    """asyncpg's "unreachable" and "refused a value" errors, once asyncpg is loaded. Only
    PostgreSQL loads it, and only then can its errors occur: SQLite users do not pay its 2 MB
    of memory in every web process."""
    if "asyncpg.exceptions" not in sys.modules:
        return (), ()
    from asyncpg.exceptions import DataError, InterfaceError, PostgresConnectionError
    from asyncpg.exceptions._base import DataError as ClientDataError

    return (PostgresConnectionError, InterfaceError), (DataError, ClientDataError)


def chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the errors it was raised from (or while handling), nearest first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def refused_by_database(exc: BaseException) -> bool:
    """True for an error the database raised over a value it will not take (a constraint,
    a too-long or malformed value), as opposed to the database being unreachable."""
    refusals: tuple[type[Exception], ...] = (IntegrityError, ValidationError)
    refusals += asyncpg_errors()[1]
    return any(isinstance(error, refusals) for error in chain(exc))


def unreachable(exc: BaseException) -> bool:
    """True when the database could not be reached or stopped answering."""
    down: tuple[type[Exception], ...] = (DBConnectionError, ConnectionError, OSError)
    down += asyncpg_errors()[0]
    return any(isinstance(error, down) for error in chain(exc))


def from_database(exc: BaseException) -> bool:
    """True for anything the database or its driver raised (not a caller's own error)."""
    raised: tuple[type[Exception], ...] = (BaseORMException, sqlite3.Error)
    if "asyncpg.exceptions" in sys.modules:
        from asyncpg.exceptions import PostgresError

        raised += (PostgresError,)
    return any(isinstance(error, raised) for error in chain(exc))
