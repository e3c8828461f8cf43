"""AWS API calls and daemon CPU for a foreach of N (default 1,000) on Batch.

    python bench/batch.py [--width 1000] [--rounds 20]

Against moto's Batch in simple mode on loopback (the sandbox's, with jobs held: the
bench plays the compute environment, since it measures the daemon's side only). The
Batch backend launches the N splits of one foreach as the engine does, then the jobs go
RUNNING and SUCCEEDED in ten waves while the backend waits for every one. Printed:

- the AWS calls made (SubmitJob, DescribeJobs, ...) against what one job per split
  needs (N SubmitJob calls; DescribeJobs is batched by 100 either way);
- the CPU time of the event loop's thread (the daemon's side: request building,
  signing, parsing, bookkeeping; moto's own work runs in its server threads and is not
  counted) per DescribeJobs round over N watched jobs, i.e. per 1,000 watched jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

for _name, _value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                      "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(_name, _value)

from millstream import sandbox  # noqa: E402
from millstream.compute.base import LaunchRequest  # noqa: E402
from millstream.compute.batch import BatchBackend  # noqa: E402
from millstream.config.settings import BatchSettings  # noqa: E402
from millstream.datastore.s3 import S3Store  # noqa: E402
from millstream.task.spec import TaskSpec  # noqa: E402


def _job(job_id: str) -> Any:
    from moto.batch.models import batch_backends

    return batch_backends[sandbox.ACCOUNT][sandbox.REGION]._jobs[job_id]


async def bench(url: str, queue: str, bucket: str, width: int, rounds: int) -> None:
    """Launch, watch and finish one foreach of ``width``; print the figures."""
    store = S3Store(bucket, "bench", endpoint_url=url)
    settings = BatchSettings(queue=queue, image="bench", endpoint_url=url, region=sandbox.REGION,
                             poll_interval_s=0.05, max_poll_interval_s=0.05, submit_rate=1000, log_rate=1000,
                             array_window_s=5)
    datastore = {"type": "s3", "bucket": bucket, "prefix": "bench", "endpoint_url": url}
    backend = BatchBackend(settings, store=store, datastore_config=datastore)
    tmp = Path(tempfile.mkdtemp(prefix="ms-bench-"))
    requests = [
        LaunchRequest(
            spec=TaskSpec(flow="BenchFlow", run_id="1", step="work", task_id=str(i), attempt=0,
                          package_dir="/p/" + "0" * 64, module_file="f.py", class_name="BenchFlow",
                          datastore=datastore, params={}, node={}, split_index=i),
            stdout_path=str(tmp / f"{i}.out"), stderr_path=str(tmp / f"{i}.err"), python="python",
            package="0" * 64, batch={"cpu": 1, "memory": 1024}, array_key="BenchFlow/1/work/start/0",
            array_size=width)
        for i in range(width)
    ]
    started = time.perf_counter()
    handles = await asyncio.gather(*(backend.launch(r) for r in requests))
    launch_s = time.perf_counter() - started
    waiters = [asyncio.create_task(backend.wait(h)) for h in handles]
    # Watch N running jobs for a while: that is the steady cost of a big foreach.
    for h in handles:
        _job(h["job_id"]).status = "RUNNABLE"
    calls_before = backend.poller.describe_calls
    cpu_before = time.thread_time()
    target = calls_before + rounds * -(-width // 100)
    while backend.poller.describe_calls < target:  # noqa: ASYNC110 - the poller has no event to offer
        await asyncio.sleep(0.01)
    cpu_watch = time.thread_time() - cpu_before
    per_round = cpu_watch / rounds
    for wave in range(10):
        for h in handles[wave::10]:
            j = _job(h["job_id"])
            j.exit_code = 0
            j._mark_stopped(success=True)
        await asyncio.sleep(0.1)
    codes = await asyncio.gather(*waiters)
    assert codes == [0] * width
    await backend.close()
    await store.close()
    print(f"foreach of {width} on Batch as one array job (launch {launch_s:.2f} s):")
    for op, count in sorted(backend.calls.items()):
        print(f"  {op:28s} {count}")
    print(f"one job per split would need {width} submit_job calls "
          f"(and the same {-(-width // 100)} describe_jobs calls per round)")
    print(f"event-loop CPU per DescribeJobs round over {width} watched jobs: {per_round * 1000:.1f} ms "
          f"({per_round * 1000 * 1000 / width:.1f} ms per 1,000 jobs; {rounds} rounds)")


def main() -> None:
    """Parse the arguments and run the bench on a private moto server."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        sandbox.configure_moto(url)
        sandbox.hold_submitted_jobs()
        config = sandbox.provision(url)
        asyncio.run(bench(url, config.queue, config.bucket, args.width, args.rounds))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
