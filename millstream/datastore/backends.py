"""Choose the object store a datastore configuration names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from millstream.datastore.storage import ObjectStore
from millstream.errors import DatastoreError


def open_store(config: dict[str, Any]) -> ObjectStore:
    """The object store for ``{"type": "local", "root": ..., "durable": ..., "inline": ...}``."""
    kind = config.get("type", "local")
    if kind == "local":
        from millstream.datastore.local import LocalStore

        return LocalStore(Path(config["root"]), durable=bool(config.get("durable", True)),
                          inline=bool(config.get("inline", False)))
    raise DatastoreError(f"unknown datastore type {kind!r}; known: local")
