"""The metadata service: the MetadataStore protocol over HTTP, on PostgreSQL.

    app.py        configuration, API-key auth, error mapping, AppRunner/TCPSite
    handlers.py   the /v1 routes: input validation, JSON in and out
    db.py         PostgresMetadataStore: every SQL statement and every asyncpg error
    schema.py     the migration runner for migrations/NNNN_*.sql
    __main__.py   ``python -m millstream.metadata.service``

Its client is :mod:`millstream.metadata.client`.
"""

from millstream.metadata.service.app import MetadataService, ServiceConfig, load_api_keys, make_app, run_service

__all__ = ["MetadataService", "ServiceConfig", "load_api_keys", "make_app", "run_service"]
