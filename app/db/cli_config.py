"""Tortoise's CLI config (`tortoise makemigrations`, `tortoise migrate`), from HAIA's settings."""

from app.config import load_settings
from app.db import ensure_sqlite_dir, tortoise_config

_URL = load_settings().database_url
ensure_sqlite_dir(_URL)
TORTOISE_ORM = tortoise_config(_URL)
