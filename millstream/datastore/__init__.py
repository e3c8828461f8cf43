"""Where flows keep their data: an async object-store port and what is built on it.

    storage    the ObjectStore protocol and the key rules every backend shares
    local      LocalStore, the object store on a local directory
    layout     the key of everything, as pure functions
    artifacts  content-addressed pickled artifacts
    records    the JSON started/done records of attempts
    package    reproducible code packages and their safe extraction
"""

from __future__ import annotations

from millstream.datastore.artifacts import ArtifactRef, ArtifactStore
from millstream.datastore.local import LocalStore
from millstream.datastore.records import AttemptKey
from millstream.datastore.storage import ObjectStore

__all__ = ["ArtifactRef", "ArtifactStore", "AttemptKey", "LocalStore", "ObjectStore"]
