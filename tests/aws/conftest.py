"""Fixtures for tests against emulated AWS: a moto server, a bucket, a fault proxy.

    moto_server   session: the process's ThreadedMotoServer (tests/aws/moto_server.py);
                  dummy credentials and MOTO_PORT are in os.environ while it runs
    moto          function, autouse here: the server, reset to empty before the test
    proxy_server  session: a FaultProxy in front of moto, serving from its own thread
    fault_proxy   function: that proxy, forwarding everything with zeroed counters
    aws_session   session: one aiobotocore session (its loaded models are reused)
    s3_client     function: a raw aiobotocore S3 client straight to moto, for checks
    bucket        function: the name of a fresh, empty bucket
    make_s3_store function: ``make_s3_store(via_proxy=True, **S3Store kwargs)``; closed
                  at teardown
    batch_sandbox function: Batch in simple mode with a queue; jobs stay SUBMITTED
    compute_env   function: a sandbox ComputeEnvironment running those jobs for real
    batch_daemon  function: a daemon on the sandbox (S3 datastore, Batch queue, fast polling)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

from millstream.datastore.retry import Backoff
from millstream.datastore.s3 import S3Store
from tests.aws.fault_proxy import FaultProxy
from tests.aws.moto_server import REGION, MotoServer, shared_moto, stop_shared_moto
from tests.conftest import Daemon

BUCKET = "millstream-test"

#: Fast backoff for tests: the policy is under test, not the waiting.
TEST_BACKOFF = {"base_s": 0.005, "cap_s": 0.05}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """The shared moto server, stopped at the end of the session."""
    yield shared_moto()
    stop_shared_moto()


@pytest.fixture(autouse=True)
def moto(moto_server: MotoServer) -> MotoServer:
    """The moto server, emptied before each test."""
    moto_server.reset()
    return moto_server


@pytest.fixture(scope="session")
def proxy_server(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of moto, on its own thread for the whole session."""
    proxy = FaultProxy(moto_server.url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def fault_proxy(proxy_server: FaultProxy) -> Iterator[FaultProxy]:
    """The proxy, faultless and with zeroed counters, reset again afterwards."""
    proxy_server.reset()
    yield proxy_server
    proxy_server.reset()


@pytest.fixture(scope="session")
def aws_session() -> AioSession:
    """One aiobotocore session, so each client does not reload botocore's models."""
    return AioSession()


@pytest.fixture
async def s3_client(moto: MotoServer, aws_session: AioSession) -> AsyncIterator[Any]:
    """A plain aiobotocore S3 client straight to moto (no proxy), for assertions."""
    config = AioConfig(retries={"mode": "standard", "total_max_attempts": 1})
    async with aws_session.create_client("s3", region_name=REGION, endpoint_url=moto.url,
                                         config=config) as client:
        yield client


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    """A fresh, empty bucket."""
    moto.create_bucket(BUCKET)
    return BUCKET


@pytest.fixture
async def make_s3_store(moto: MotoServer, fault_proxy: FaultProxy, bucket: str,
                        aws_session: AioSession) -> AsyncIterator[Callable[..., S3Store]]:
    """Build S3Stores on the test bucket, through the fault proxy unless told otherwise."""
    made: list[S3Store] = []

    def make(*, via_proxy: bool = True, retries: int = 8, **kwargs: Any) -> S3Store:
        kwargs.setdefault("prefix", "ms")
        kwargs.setdefault("backoff", Backoff(retries, **TEST_BACKOFF))
        store = S3Store(kwargs.pop("bucket", bucket),
                        endpoint_url=fault_proxy.url if via_proxy else moto.url,
                        session=aws_session, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
def batch_sandbox(moto: MotoServer, bucket: str) -> Iterator[Any]:
    """moto Batch in simple mode with a queue, submitted jobs held (not run) for the test."""
    from millstream import sandbox

    moto.configure({"batch": {"use_docker": False}})
    sandbox.hold_submitted_jobs()
    config = sandbox.provision(moto.url, bucket=bucket)
    yield config
    sandbox.ComputeEnvironment().drain_queue()


@pytest.fixture
def compute_env(batch_sandbox: Any) -> Iterator[Any]:
    """An emulated compute environment that really runs the held jobs, three at a time."""
    from millstream import sandbox

    env = sandbox.ComputeEnvironment(slots=3).start()
    yield env
    env.stop()
    env.drain_queue()


@pytest.fixture
def batch_daemon(daemon_factory: Callable[..., Daemon], batch_sandbox: Any, compute_env: Any) -> Iterator[Daemon]:
    """A daemon on the sandbox: S3 datastore, Batch queue, fast polling."""
    d = daemon_factory(batch_poll_interval_s="0.1", batch_max_poll_interval_s="0.5", batch_array_window_s="1")
    d.env.update(batch_sandbox.environment())
    d.env["MILLSTREAM_DATASTORE_PREFIX"] = "ms"
    d.env["MILLSTREAM_METADATA_PATH"] = str(d.root / "metadata.db")
    d.start()
    yield d
