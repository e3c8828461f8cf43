"""Open the metadata store the settings name."""

from __future__ import annotations

import os
from pathlib import Path

from millstream.config.settings import MetadataSettings
from millstream.errors import ConfigError
from millstream.metadata.store import MetadataStore


def metadata_store(settings: MetadataSettings) -> MetadataStore:
    """The (not yet opened) store: embedded SQLite, or the HTTP client of the service."""
    if settings.type == "sqlite":
        from millstream.metadata.sqlite import SqliteMetadataStore

        path = Path(settings.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteMetadataStore(path, dead_after_s=settings.dead_after_s)
    from millstream.metadata.client import ServiceMetadataStore

    key = settings.api_key
    if settings.api_key_file and not key:
        try:
            key = Path(os.path.expanduser(settings.api_key_file)).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"metadata.api_key_file {settings.api_key_file}: {exc.strerror}") from None
    if not key:
        raise ConfigError("metadata.type = service needs an API key: set metadata.api_key_file "
                          "or MILLSTREAM_METADATA_API_KEY")
    return ServiceMetadataStore(settings.url, api_key=key)
