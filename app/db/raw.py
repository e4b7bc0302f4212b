"""A generation's hot statements as plain SQL, on SQLite and PostgreSQL alike.

Tortoise's query builder costs 150 to 300 µs of CPU per statement (pypika copies and renders
the whole query each time); a generation runs half a dozen, and at a few hundred concurrent
generations that was a quarter of the worker's time. Here a statement is a string and its
values go through the same `to_db_value` conversions the ORM applies, and rows come back
through the ORM's own `_init_from_db`: what is read and written is exactly what the ORM reads
and writes, for a fifth of the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from tortoise import connections, timezone
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.fields import DatetimeField
from tortoise.models import Model

M = TypeVar("M", bound=Model)

_MANY = (set, frozenset, list, tuple)


def _db() -> BaseDBAsyncClient:
    db: BaseDBAsyncClient = connections.get("default")
    return db


class Statement:
    """Collects values and hands out the dialect's placeholder for each (`?` or `$n`)."""

    def __init__(self, db: BaseDBAsyncClient, model: type[Model]) -> None:
        self.postgres = db.capabilities.dialect == "postgres"
        self.model = model
        self.values: list[Any] = []

    def mark(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}" if self.postgres else "?"

    def field(self, name: str, value: Any) -> str:
        """`value` of field `name`, converted as the ORM converts it; its placeholder."""
        field = self.model._meta.fields_map[name]
        if value is None and field.null:
            return self.mark(None)  # what the ORM makes of it, without calling its validators
        return self.mark(field.to_db_value(value, None))  # type: ignore[arg-type] # as the ORM

    def column(self, name: str) -> str:
        return f'"{self.model._meta.fields_db_projection[name]}"'

    def where(self, conditions: Mapping[str, Any]) -> str:
        """Each field equal to its value; a set, list or tuple of values: IN."""
        parts = []
        for name, value in conditions.items():
            if isinstance(value, _MANY):
                marks = ", ".join(self.field(name, one) for one in value)
                parts.append(f"{self.column(name)} IN ({marks})")
            else:
                parts.append(f"{self.column(name)} = {self.field(name, value)}")
        return " AND ".join(parts)


def table(model: type[Model]) -> str:
    return f'"{model._meta.db_table}"'


async def update(model: type[Model], changes: Mapping[str, Any], **where: Any) -> int:
    """`UPDATE … SET changes WHERE where`; the number of rows changed."""
    db = _db()
    statement = Statement(db, model)
    sets = ", ".join(
        f"{statement.column(name)} = {statement.field(name, value)}"
        for name, value in changes.items()
    )
    sql = f"UPDATE {table(model)} SET {sets} WHERE {statement.where(where)}"
    changed, _ = await db.execute_query(sql, statement.values)
    return int(changed)


async def first(model: type[M], **where: Any) -> M | None:
    """The one row matching `where`, or None (for a unique key)."""
    rows = await select(model, lambda s: f"SELECT * FROM {table(model)} WHERE {s.where(where)}")
    return rows[0] if rows else None


async def select(model: type[M], build: Callable[[Statement], str]) -> list[M]:
    """The rows of the query `build(statement)` returns, as `model` instances."""
    db = _db()
    statement = Statement(db, model)
    sql = build(statement)
    rows: Iterable[Any] = (await db.execute_query(sql, statement.values))[1]
    return [model._init_from_db(**dict(row)) for row in rows]


def filled(model: type[Model], row: Mapping[str, Any], name: str, now: datetime) -> Any:
    """Field `name` of `row` as the ORM fills an unsaved instance: the value given, else the
    field's default; `now` for an `auto_now` or `auto_now_add` field."""
    if name in row:
        return row[name]
    field = model._meta.fields_map[name]
    if isinstance(field, DatetimeField) and (field.auto_now or field.auto_now_add):
        return now
    default = field.default
    return default() if callable(default) else default


async def insert(
    model: type[Model], rows: Sequence[Mapping[str, Any]], *, returning: Sequence[str] = ()
) -> list[tuple[Any, ...]]:
    """`INSERT` every row in one statement, filled as the ORM fills an unsaved instance: a
    field not given takes its default, `auto_now` and `auto_now_add` fields the same `now`.
    A generated primary key (an auto-increment id) is left to the database. With
    `returning`, those fields of every row inserted, as the database gives them."""
    if not rows:
        return []
    db = _db()
    statement = Statement(db, model)
    now = timezone.now()
    generated = set(model._meta.generated_db_fields)
    names = [name for name in model._meta.fields_db_projection if name not in generated]
    tuples = []
    for row in rows:
        marks = (statement.field(name, filled(model, row, name, now)) for name in names)
        tuples.append(f"({', '.join(marks)})")
    columns = ", ".join(statement.column(name) for name in names)
    sql = f"INSERT INTO {table(model)} ({columns}) VALUES {', '.join(tuples)}"
    if not returning:
        await db.execute_query(sql, statement.values)
        return []
    wanted = [model._meta.fields_db_projection[name] for name in returning]
    sql += " RETURNING " + ", ".join(f'"{column}"' for column in wanted)
    # `execute_query_dict`: PostgreSQL's `execute_query` runs an INSERT without its rows.
    found = await db.execute_query_dict(sql, statement.values)
    return [tuple(row[column] for column in wanted) for row in found]


async def values(model: type[Model], build: Callable[[Statement], str]) -> list[tuple[Any, ...]]:
    """The rows of the query `build(statement)` returns, as plain tuples of database values
    (no model instances: for the columns a caller needs, unconverted)."""
    db = _db()
    statement = Statement(db, model)
    rows: Iterable[Any] = (await db.execute_query(build(statement), statement.values))[1]
    return [tuple(row) for row in rows]
