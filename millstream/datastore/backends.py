"""Choose the object store a datastore configuration names."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
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
    if kind == "s3":
        # {"type": "s3", "bucket", "prefix", "region", "endpoint_url", "sse", "sse_kms_key_id",
        #  "max_concurrency", "multipart_threshold_mb", "part_size_mb", "retries"}; other keys
        # (root, durable, inline) are ignored, so the whole settings section can be passed.
        from millstream.datastore.s3 import S3Store

        return S3Store.from_config(config)
    raise DatastoreError(f"unknown datastore type {kind!r}; known: local, s3")


def store_fingerprint(config: Mapping[str, Any]) -> str:
    """A short digest of where a datastore configuration points, to tell two worlds apart.

    A client compares it with a daemon's (``GET /v1/health``) before letting that daemon
    change what the client read: a daemon on the default socket may keep another store.
    The digest names no path or bucket, so the unauthenticated health probe leaks none.
    """
    kind = config.get("type", "local")
    if kind == "local":
        where: list[Any] = [kind, os.path.abspath(str(config.get("root", "")))]
    else:
        where = [kind, config.get("bucket", ""), config.get("prefix", ""), config.get("endpoint_url", "")]
    return hashlib.sha256(json.dumps(where).encode()).hexdigest()[:16]
