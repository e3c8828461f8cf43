"""How long does resume spend cloning? A foreach of N (default 1,000) whose join failed.

    python bench/resume.py [--width 1000] [--repeat 3]

Runs the flow once with a failing join, then resumes it REPEAT times (from the same
origin) through one warm daemon, and prints for each resume: the cloning time (from the
new run's creation to the moment the join, the first task that must run, starts) and
the wall time of the whole ``resume`` command. Medians at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOW = '''
import os
from millstream import FlowSpec, Parameter, step


class ResumeBenchFlow(FlowSpec):
    width = Parameter("width", default=1000)

    @step
    def start(self):
        self.items = list(range(self.width))
        self.next(self.work, foreach="items")

    @step
    def work(self):
        self.value = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        if os.environ.get("FAIL_JOIN"):
            raise RuntimeError("join fails on purpose")
        self.total = sum(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ResumeBenchFlow()
'''


def _get(sock: str, path: str) -> dict:
    import http.client

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(sock)

    conn = Conn("localhost")
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def _events(sock: str, path: str) -> list:
    import http.client

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(sock)

    conn = Conn("localhost")
    conn.request("GET", path)
    return [json.loads(line) for line in conn.getresponse().read().splitlines() if line]


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="msb-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILLSTREAM_")}
    env.update(MILLSTREAM_DAEMON_SOCKET=str(root / "d.sock"), MILLSTREAM_DATASTORE_ROOT=str(root / "ds"),
               MILLSTREAM_DAEMON_STATE_DIR=str(root / "state"), MILLSTREAM_CONFIG=str(root / "none.toml"))
    # The flow lives apart from the datastore: its directory is what the code package holds.
    (root / "flow").mkdir()
    flow = root / "flow" / "resume_bench.py"
    flow.write_text(FLOW)
    profile = ["-m", "cProfile", "-o", os.environ["PROFILE_DAEMON"]] if os.environ.get("PROFILE_DAEMON") else []
    daemon = subprocess.Popen([sys.executable, *profile, "-m", "millstream.daemon"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (root / "d.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        common = ["--max-num-splits", str(args.width)]
        origin_file = root / "origin"
        # The origin fails at its join on purpose: a non-zero exit is expected.
        subprocess.run([sys.executable, str(flow), "--quiet", "run", "--width", str(args.width),
                        "--run-id-file", str(origin_file), *common],
                       env={**env, "FAIL_JOIN": "1"}, capture_output=True, timeout=600, check=False)
        origin = origin_file.read_text().strip()
        clone_s, wall_s = [], []
        for i in range(args.repeat):
            id_file = root / f"resumed-{i}"
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, str(flow), "--quiet", "resume", "--origin-run-id", origin,
                                   "--run-id-file", str(id_file), *common],
                                  env=env, capture_output=True, text=True, timeout=600, check=False)
            wall_s.append(time.perf_counter() - started)
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr)
                return 1
            run_path = f"/v1/runs/ResumeBenchFlow/{id_file.read_text().strip()}"
            state = _get(env["MILLSTREAM_DAEMON_SOCKET"], run_path)
            join = next(t for t in state["tasks"] if t["step"] == "join")
            cloned = sum(1 for t in state["tasks"] if (t["attempts"][-1]["handle"] or {}).get("cloned_from"))
            clone_s.append(join["attempts"][0]["started_at"] - state["created_at"])
            if os.environ.get("BENCH_EVENTS"):
                events = _events(env["MILLSTREAM_DAEMON_SOCKET"], f"{run_path}/events")
                t0 = events[0]["ts"]
                marks = {}
                for e in events:
                    marks.setdefault(e["event"] + ":first", e["ts"] - t0)
                    marks[e["event"] + ":last"] = e["ts"] - t0
                print({k: round(v, 3) for k, v in marks.items()})
            print(f"resume {i + 1}: cloned {cloned} tasks in {clone_s[-1]:.3f} s; resume command {wall_s[-1]:.2f} s")
        print(f"median cloning {statistics.median(clone_s):.3f} s, "
              f"median resume wall {statistics.median(wall_s):.2f} s (foreach of {args.width}, {args.repeat} resumes)")
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
