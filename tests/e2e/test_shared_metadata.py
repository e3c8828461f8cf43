"""Two daemons, one metadata store: each sees the other's runs (SQLite file, then the service)."""

from __future__ import annotations

from tests.conftest import EXAMPLES, Daemon, wait_until
from tests.e2e.helpers import run_flow
from tests.metadata.service_fixture import API_KEY


def _pair(daemon_factory, **settings: str) -> tuple[Daemon, Daemon]:  # type: ignore[no-untyped-def]
    a = daemon_factory(daemon_id="a", **settings)
    b = daemon_factory(daemon_id="b", **settings)
    # Both use a's datastore (and, by default, the metadata file beside it).
    b.env["MILLSTREAM_DATASTORE_ROOT"] = a.env["MILLSTREAM_DATASTORE_ROOT"]
    a.start()
    b.start()
    return a, b


def _check_shared(a: Daemon, b: Daemon) -> None:
    first, proc = run_flow(a, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    second, proc = run_flow(b, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(second) == int(first) + 1  # one id sequence, whichever daemon allocates

    def listed() -> bool:
        status, body = b.request("GET", "/v1/runs?flow=HelloFlow")
        return status == 200 and {(r["run_id"], r["status"]) for r in body["runs"]} == {(first, "ok"), (second, "ok")}

    wait_until(listed, 15)
    out = a.cli("runs", "--flow", "HelloFlow")
    assert out.returncode == 0 and first in out.stdout and second in out.stdout
    # a's daemon answers for b's run from the store.
    detail = a.run_state("HelloFlow", second)
    assert detail["status"] == "ok" and {t["step"] for t in detail["tasks"]} == {"start", "greet", "end"}


def test_two_daemons_share_a_sqlite_store(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    _check_shared(*_pair(daemon_factory))


def test_two_daemons_share_the_metadata_service(daemon_factory, metadata_service: str) -> None:  # type: ignore[no-untyped-def]
    a, b = _pair(daemon_factory, metadata_type="service", metadata_url=metadata_service, metadata_api_key=API_KEY)
    _check_shared(a, b)
