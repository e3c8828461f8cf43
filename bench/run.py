"""Wall time of ``python FLOW.py run`` on millstream and on Metaflow, and the daemon's memory.

One warm millstream daemon is started in a temporary directory, with its own socket,
datastore and state dir (a durable datastore, as a user has it), and warmed with one
``hello`` run. Every flow of :mod:`flows` is then run ``--repeat`` times as a user runs
it, and the wall time of the whole command is taken. Where an interpreter that can
``import metaflow`` is found (``--metaflow-python``, else ``$METAFLOW_PYTHON``, this
interpreter, or ``/tmp/mfvenv/bin/python``), the same flows run on Metaflow in local
mode, with its home, datastore and metadata in the same temporary directory, interleaved
with the millstream runs so that a noisy machine weighs on both alike. Last, ten
``foreach1000`` runs are submitted at once and the daemon's VmRSS is sampled until they
end. The daemon is stopped, and the directory removed, at the end.

Metaflow's ``foreach1000`` takes minutes: it runs once, within a budget
(``--metaflow-slow-budget``); a run over budget is stopped and counted as a lower
bound, so the ratio shown is an upper bound.

    python bench/run.py                        # everything, about 20-40 minutes here
    python bench/run.py --quick                # two runs each, no foreach1000, no memory
    python bench/run.py --flows hello,foreach100 --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flows import FLOWS, write_flows

from millstream.client.http import DaemonClient
from millstream.errors import ApiError

# The ratio millstream/Metaflow each flow should stay under (median wall times).
TARGET_RATIO = {"hello": 0.5, "linear20": 0.2, "foreach100": 0.1, "foreach1000": 0.1}
TARGET_RSS_MB = 150.0
# Metaflow 2.19 on this machine, measured earlier; foreach100 with its best --max-workers.
REFERENCE_METAFLOW_S = {"hello": 0.67, "linear20": 5.0, "branch8": 3.0, "foreach100": 12.2, "foreach1000": 159.0}
METAFLOW_DEFAULT_WORKERS = 16
METAFLOW_CANDIDATES = ("/tmp/mfvenv/bin/python",)
SAMPLE_INTERVAL_S = 0.2
OUTPUT_TAIL_LINES = 40


@dataclass
class Series:
    """Wall times of one command, repeated."""

    times_s: list[float] = field(default_factory=list)
    failures: int = 0
    # A run stopped at its budget: it took at least this long (a bound, not a failure).
    over_budget_s: float | None = None

    def summary(self) -> dict[str, Any]:
        """Median, min and max, in seconds."""
        if not self.times_s:
            return {"n": 0, "failures": self.failures, "over_budget_s": self.over_budget_s}
        return {
            "n": len(self.times_s),
            "failures": self.failures,
            "median_s": statistics.median(self.times_s),
            "min_s": min(self.times_s),
            "max_s": max(self.times_s),
            "times_s": self.times_s,
            "over_budget_s": self.over_budget_s,
        }


def _median(series: Series) -> float | None:
    return statistics.median(series.times_s) if series.times_s else None


def _serving(path: str) -> bool:
    """The daemon answers its health check (listening alone is not serving yet)."""
    try:
        return DaemonClient(path).health() is not None
    except ApiError:
        return False


def _proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, found through the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Daemon:
    """A millstream daemon in its own directory, started as ``python -m millstream.daemon``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        env = {k: v for k, v in os.environ.items() if not k.startswith("MILLSTREAM_")}
        env.update(
            {
                "MILLSTREAM_DAEMON_SOCKET": str(root / "d.sock"),
                "MILLSTREAM_DATASTORE_ROOT": str(root / "ds"),
                "MILLSTREAM_DAEMON_STATE_DIR": str(root / "state"),
                "MILLSTREAM_CONFIG": str(root / "config.toml"),
            }
        )
        self.env = env
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the daemon and wait until its socket answers."""
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "millstream.daemon"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout_s
        while not _serving(self.env["MILLSTREAM_DAEMON_SOCKET"]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM, then make sure nothing it started is left behind."""
        if self.proc is None:
            return
        leftovers = _descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Zygotes and task processes run in their own sessions; end the ones this daemon started.
        marker = str(self.root).encode()
        for pid in leftovers:
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{pid}/environ").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        self.proc = None


@dataclass
class Runner:
    """Runs one flow file as a user does and times the whole command."""

    python: str
    env: dict[str, str]
    prefix: tuple[str, ...]  # options before ``run``
    timeout_s: float

    def command(self, flow: Path, workers: int) -> list[str]:
        """The command line."""
        return [self.python, str(flow), *self.prefix, "run", "--max-workers", str(workers), "--max-num-splits", "1000"]

    def time(self, flow: Path, workers: int, series: Series, label: str, budget_s: float | None = None) -> None:
        """One timed run, added to ``series``; a failure is reported with its output and counted.

        The command runs in its own session so that a timeout ends the whole process group
        (Metaflow's task subprocesses included), not only the command. With ``budget_s``,
        a run still going at the budget is stopped and recorded as a lower bound.
        """
        command = self.command(flow, workers)
        limit_s = budget_s if budget_s is not None else self.timeout_s
        start = time.perf_counter()
        with subprocess.Popen(
            command,
            env=self.env,
            cwd=flow.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as proc:
            try:
                out, _ = proc.communicate(timeout=limit_s)
                code: int | str = proc.returncode
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                code = "timeout"
        elapsed = time.perf_counter() - start
        if code == 0:
            series.times_s.append(elapsed)
            print(f"  {label:<34} {elapsed:8.2f} s", flush=True)
        elif code == "timeout" and budget_s is not None:
            series.over_budget_s = limit_s
            print(f"  {label:<34} stopped at its {limit_s:.0f} s budget: counted as > {limit_s:.0f} s", flush=True)
        else:
            series.failures += 1
            tail = "\n".join(f"    | {line}" for line in (out or "").splitlines()[-OUTPUT_TAIL_LINES:])
            reason = f"timed out after {limit_s:.0f} s" if code == "timeout" else f"exit code {code}"
            print(
                f"  {label:<34} FAILED ({reason}) after {elapsed:.2f} s\n    $ {' '.join(command)}\n{tail}", flush=True
            )


def metaflow_version(python: str) -> str | None:
    """Metaflow's version in ``python``, or None where it cannot be imported."""
    try:
        done = subprocess.run(
            [python, "-c", "import metaflow; print(metaflow.__version__)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else None


def find_metaflow(given: str | None, env: dict[str, str]) -> tuple[str | None, str | None, list[str]]:
    """The first interpreter that imports metaflow: (python, version, interpreters tried)."""
    if given:
        candidates = [given]
    else:
        candidates = [c for c in (env.get("METAFLOW_PYTHON"), sys.executable, *METAFLOW_CANDIDATES) if c]
    tried = []
    for python in dict.fromkeys(candidates):
        tried.append(python)
        version = metaflow_version(python)
        if version:
            return python, version, tried
    return None, None, tried


def metaflow_env(root: Path) -> dict[str, str]:
    """Local datastore and metadata under ``root``; nothing in the user's home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "HOME": str(home),
            "METAFLOW_HOME": str(root / "metaflow-home"),
            "USERNAME": "bench",
            "METAFLOW_DEFAULT_DATASTORE": "local",
            "METAFLOW_DEFAULT_METADATA": "local",
            "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root / "metaflow-store"),
        }
    )
    return env


def measure_memory(daemon: Daemon, flow: Path, runner: Runner, runs: int, workers: int) -> dict[str, Any]:
    """Submit ``runs`` runs of ``flow`` at once and sample the daemon's RSS until all end."""
    logs = daemon.root / "memory-runs"
    logs.mkdir(exist_ok=True)
    baseline_kb = _proc_status_kb(daemon.pid, "VmRSS") or 0
    peak_kb, peak_tree_kb, samples = baseline_kb, 0, 0
    procs = []
    start = time.perf_counter()
    for i in range(runs):
        with open(logs / f"run-{i}.log", "wb") as out:
            procs.append(
                subprocess.Popen(
                    runner.command(flow, workers),
                    env=runner.env,
                    cwd=flow.parent,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
    deadline = start + runner.timeout_s * runs
    while any(p.poll() is None for p in procs) and time.perf_counter() < deadline:
        rss = _proc_status_kb(daemon.pid, "VmRSS") or 0
        tree = rss + sum(_proc_status_kb(pid, "VmRSS") or 0 for pid in _descendants(daemon.pid))
        peak_kb, peak_tree_kb, samples = max(peak_kb, rss), max(peak_tree_kb, tree), samples + 1
        time.sleep(SAMPLE_INTERVAL_S)
    elapsed = time.perf_counter() - start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    for i in failed:
        tail = "\n".join((logs / f"run-{i}.log").read_text(errors="replace").splitlines()[-10:])
        print(f"  memory run {i} FAILED ({procs[i].returncode}):\n{tail}", flush=True)
    return {
        "runs": runs,
        "flow": flow.stem,
        "failed": len(failed),
        "wall_s": elapsed,
        "samples": samples,
        "baseline_rss_mb": baseline_kb / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "after_rss_mb": (_proc_status_kb(daemon.pid, "VmRSS") or 0) / 1024,
        "hwm_since_start_mb": (_proc_status_kb(daemon.pid, "VmHWM") or 0) / 1024,
        "peak_tree_rss_sum_mb": peak_tree_kb / 1024,
        "target_rss_mb": TARGET_RSS_MB,
        "met": peak_kb / 1024 < TARGET_RSS_MB and not failed,
    }


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def _met(ratio: float | None, target: float | None, upper_bound: bool) -> bool | None:
    """Whether ``ratio`` meets ``target``; unknown when there is none, or when only a bound above it is known."""
    if ratio is None or target is None:
        return None
    if ratio <= target:
        return True
    return None if upper_bound else False


def build_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (flow, Metaflow setting) compared."""
    rows = []
    for name, res in results.items():
        ms = res["millstream"]
        mf = res.get("metaflow", {})
        best = res.get("metaflow_best_workers")
        tuned = len(mf) > 1 and best is not None
        settings = [("default", METAFLOW_DEFAULT_WORKERS)] if mf else [("", None)]
        if tuned and best == METAFLOW_DEFAULT_WORKERS:
            settings = [("best=default", METAFLOW_DEFAULT_WORKERS)]
        elif tuned:
            settings.append(("best", best))
        for kind, workers in settings:
            mfs = mf.get(str(workers), {}) if workers is not None else {}
            ms_med, mf_med = ms.get("median_s"), mfs.get("median_s")
            # A Metaflow run stopped at its budget took longer than that: the ratio is then an upper bound.
            bound = mf_med is None and mfs.get("over_budget_s") is not None
            mf_s = mfs.get("over_budget_s") if bound else mf_med
            ratio = ms_med / mf_s if ms_med and mf_s else None
            target = TARGET_RATIO.get(name)
            # Where several --max-workers were tried, the target is taken against Metaflow's best.
            judged = kind.startswith("best") or not tuned
            rows.append(
                {
                    "flow": name,
                    "millstream": ms,
                    "metaflow_workers": workers,
                    "metaflow_setting": kind,
                    "metaflow": mfs,
                    "ratio": ratio,
                    "ratio_is_upper_bound": bound,
                    "target_ratio": target if judged else None,
                    "met": _met(ratio, target if judged else None, bound),
                    "reference_metaflow_s": REFERENCE_METAFLOW_S.get(name),
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]], memory: dict[str, Any] | None, results: dict[str, Any]) -> None:
    """The final table: medians (min-max) and the ratio millstream/Metaflow."""
    head = (
        f"{'flow':<12} {'millstream median (min-max) n':<30} {'Metaflow workers':>16} "
        f"{'Metaflow median (min-max) n':<30} {'ratio':>6} {'target':>7} {'met':>4} {'MF ref':>7} {'vs ref':>6}"
    )
    if rows:
        print("\n" + head + "\n" + "-" * len(head))
    for row in rows:
        ms, mf = row["millstream"], row["metaflow"]
        ms_cell = (
            f"{_fmt(ms.get('median_s'))} ({_fmt(ms.get('min_s'))}-{_fmt(ms.get('max_s'))}) {ms['n']}"
            if ms.get("n")
            else "-"
        )
        mf_cell = (
            f"{_fmt(mf.get('median_s'))} ({_fmt(mf.get('min_s'))}-{_fmt(mf.get('max_s'))}) {mf['n']}"
            if mf.get("n")
            else "-"
        )
        ratio = _fmt(row["ratio"])
        ref, ms_med = row["reference_metaflow_s"], ms.get("median_s")
        vs_ref = ms_med / ref if ref and ms_med else None
        if row.get("ratio_is_upper_bound"):
            mf_cell, ratio = f"> {mf['over_budget_s']:.0f} (stopped) 1", f"<{ratio}"
        workers = f"{row['metaflow_setting']} {row['metaflow_workers']}" if row["metaflow_workers"] else "-"
        target = f"<={row['target_ratio']}" if row["target_ratio"] is not None else ""
        met = {True: "yes", False: "NO", None: ""}[row["met"]]
        print(
            f"{row['flow']:<12} {ms_cell:<30} {workers:>16} {mf_cell:<30} {ratio:>6} "
            f"{target:>7} {met:>4} {_fmt(ref):>7} {_fmt(vs_ref):>6}"
        )
    if rows:
        print(
            "(seconds of wall time per `python FLOW.py run`; ratio = millstream median / Metaflow median;\n"
            " MF ref = Metaflow 2.19 measured earlier on this machine, quieter; vs ref = millstream median / MF ref)"
        )
    for name, res in results.items():
        if len(res.get("metaflow", {})) > 1:
            tried = ", ".join(f"{w}: {_fmt(s.get('median_s'))} s" for w, s in res["metaflow"].items())
            print(f"{name}: Metaflow median by --max-workers: {tried}")
    if any(r.get("ratio_is_upper_bound") for r in rows):
        print("(a Metaflow run stopped at its budget took at least that long: its ratio is an upper bound)")
    if memory:
        print(
            f"\ndaemon VmRSS with {memory['runs']} {memory['flow']} runs submitted at once: "
            f"peak {memory['peak_rss_mb']:.1f} MB (target < {TARGET_RSS_MB:.0f} MB: "
            f"{'yes' if memory['met'] else 'NO'}), before {memory['baseline_rss_mb']:.1f} MB, "
            f"after {memory['after_rss_mb']:.1f} MB, VmHWM since start {memory['hwm_since_start_mb']:.1f} MB; "
            f"all {memory['runs']} done in {memory['wall_s']:.1f} s, {memory['failed']} failed; "
            f"daemon + child processes, RSS summed: peak {memory['peak_tree_rss_sum_mb']:.1f} MB"
        )


QUICK_FLOWS = ("hello", "linear20", "branch8", "foreach100")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--repeat", type=int, default=None, help="millstream runs per flow [5; 2 with --quick]")
    p.add_argument("--metaflow-repeat", type=int, default=None, help="Metaflow runs per flow [as --repeat]")
    p.add_argument("--repeat-foreach1000", type=int, default=3, help="millstream runs of foreach1000 [3]")
    p.add_argument(
        "--metaflow-repeat-foreach1000", type=int, default=1, help="Metaflow runs of foreach1000, minutes each [1]"
    )
    p.add_argument(
        "--metaflow-slow-budget",
        type=float,
        default=600.0,
        help="seconds a Metaflow foreach1000 run may take before it is stopped and counted as a lower bound [600]",
    )
    p.add_argument(
        "--flows",
        "--only",
        dest="flows",
        default="",
        help=f"comma-separated flows, of {','.join(FLOWS)} [all; {','.join(QUICK_FLOWS)} with --quick]",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2 runs per flow, no foreach1000, no Metaflow --max-workers tuning, no memory",
    )
    p.add_argument("--max-workers", type=int, default=16, help="millstream --max-workers [16]")
    p.add_argument(
        "--metaflow-python",
        default=None,
        help="an interpreter that can import metaflow [$METAFLOW_PYTHON, this one, "
        f"{', '.join(METAFLOW_CANDIDATES)}: the first that can]",
    )
    p.add_argument("--no-metaflow", action="store_true", help="millstream only")
    p.add_argument(
        "--metaflow-tune-workers",
        default="4,8",
        help="other Metaflow --max-workers tried on foreach100 [4,8; none with --quick]",
    )
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="submit foreach1000 runs at once and sample the daemon's RSS [on; off with --quick]",
    )
    p.add_argument("--memory-runs", type=int, default=10, help="runs submitted at once for the memory figure [10]")
    p.add_argument("--skip-timing", action="store_true", help="measure memory only")
    p.add_argument("--timeout", type=float, default=900.0, help="per command, seconds [900]")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--show",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the table of a report written by --json, and run nothing",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.flows = args.flows or ",".join(QUICK_FLOWS)
        args.metaflow_tune_workers = ""
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    if args.memory is None:
        args.memory = not args.quick
    if args.metaflow_repeat is None:
        args.metaflow_repeat = args.repeat
    for name in ("repeat", "metaflow_repeat", "repeat_foreach1000", "metaflow_repeat_foreach1000", "memory_runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.flows = [n for n in args.flows.split(",") if n] or list(FLOWS)
    unknown = set(args.flows) - set(FLOWS)
    if unknown:
        p.error(f"unknown flows: {', '.join(sorted(unknown))}; known: {', '.join(FLOWS)}")
    try:
        args.tune = [int(w) for w in args.metaflow_tune_workers.split(",") if w]
    except ValueError:
        p.error(f"--metaflow-tune-workers takes comma-separated integers, got {args.metaflow_tune_workers!r}")
    return args


def run_timings(
    args: argparse.Namespace, ms_files: dict[str, Path], ms: Runner, mf_files: dict[str, Path] | None, mf: Runner | None
) -> dict[str, Any]:
    """Every selected flow on both, interleaved run by run."""
    results: dict[str, Any] = {}
    for name in args.flows:
        big = name == "foreach1000"
        ms_n = args.repeat_foreach1000 if big else args.repeat
        mf_n = args.metaflow_repeat_foreach1000 if big else args.metaflow_repeat
        budget_s = args.metaflow_slow_budget if big else None
        mf_workers = [METAFLOW_DEFAULT_WORKERS]
        if name == "foreach100":
            mf_workers += [w for w in args.tune if w != METAFLOW_DEFAULT_WORKERS]
        ms_series, mf_series = Series(), {w: Series() for w in mf_workers}
        print(f"{name}:", flush=True)
        for i in range(max(ms_n, mf_n if mf else 0)):
            if i < ms_n:
                ms.time(ms_files[name], args.max_workers, ms_series, f"millstream #{i + 1}")
            if mf is not None and mf_files is not None and i < mf_n:
                for w in mf_workers:
                    if mf_series[w].over_budget_s is None:
                        mf.time(mf_files[name], w, mf_series[w], f"metaflow --max-workers {w} #{i + 1}", budget_s)
        res: dict[str, Any] = {"millstream": ms_series.summary(), "millstream_workers": args.max_workers}
        if mf is not None:
            res["metaflow"] = {str(w): s.summary() for w, s in mf_series.items()}
            timed = {w: _median(s) for w, s in mf_series.items() if s.times_s}
            if timed:
                res["metaflow_best_workers"] = min(timed, key=lambda w: timed[w])
        results[name] = res
    return results


def main(argv: list[str]) -> int:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    if args.show:
        saved = json.loads(args.show.read_text(encoding="utf-8"))
        print(f"{saved['date']}, {saved['machine']['cores']} cores, Metaflow {saved['metaflow_version']}")
        print_table(build_rows(saved["results"]), saved["memory"], saved["results"])
        return 0
    mf_python = mf_version = None
    if args.no_metaflow or args.skip_timing:
        print("Metaflow not run (--no-metaflow or --skip-timing): millstream figures only", flush=True)
    else:
        mf_python, mf_version, tried = find_metaflow(args.metaflow_python, dict(os.environ))
        if mf_python is None:
            print(
                f"Metaflow is not installed (no `import metaflow` in {', '.join(tried)}): millstream figures "
                "only; install it with `python3 -m venv /tmp/mfvenv && /tmp/mfvenv/bin/pip install metaflow`",
                flush=True,
            )
        else:
            print(f"Metaflow {mf_version} from {mf_python}, local datastore and metadata", flush=True)
    # Unix socket paths are limited to 108 bytes: keep the root short.
    root = Path(tempfile.mkdtemp(prefix="msbench-", dir="/tmp"))
    ms_files = write_flows(root / "flows", "millstream")
    daemon = Daemon(root / "ms")
    daemon.root.mkdir()
    ms = Runner(python=sys.executable, env=daemon.env, prefix=(), timeout_s=args.timeout)
    mf = mf_files = None
    if mf_python:
        mf_files = write_flows(root / "flows", "metaflow")
        mf = Runner(python=mf_python, env=metaflow_env(root / "mf"), prefix=("--no-pylint",), timeout_s=args.timeout)
    print(
        f"{os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; in {root}", flush=True
    )
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg(),
        },
        "millstream_python": sys.executable,
        "metaflow_python": mf_python,
        "metaflow_version": mf_version,
        "millstream_max_workers": args.max_workers,
        "targets": {"ratio": TARGET_RATIO, "rss_mb": TARGET_RSS_MB},
        "reference_metaflow_s": REFERENCE_METAFLOW_S,
    }
    results: dict[str, Any] = {}
    memory = None
    try:
        daemon.start()
        warm = Series()
        ms.time(ms_files["hello"], args.max_workers, warm, "warm-up: millstream hello")
        if mf is not None and mf_files is not None:
            mf.time(mf_files["hello"], METAFLOW_DEFAULT_WORKERS, warm, "warm-up: metaflow hello")
        if warm.failures:
            print("a warm-up run failed: stopping", flush=True)
            return 1
        if not args.skip_timing:
            results = run_timings(args, ms_files, ms, mf_files, mf)
        if args.memory:
            print(f"memory: {args.memory_runs} foreach1000 runs at once", flush=True)
            memory = measure_memory(daemon, ms_files["foreach1000"], ms, args.memory_runs, args.max_workers)
    finally:
        daemon.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = build_rows(results)
    print(
        f"\n{report['date']}, {os.cpu_count()} cores, Metaflow {mf_version or 'not run'}, "
        f"load average {' '.join(f'{x:.2f}' for x in report['machine']['loadavg_start'])} at the start, "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end"
    )
    print_table(rows, memory, results)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report.update({"results": results, "rows": rows, "memory": memory})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    failed = any(r["millstream"].get("failures") or r["metaflow"].get("failures") for r in rows)
    return 1 if failed or (memory and memory["failed"]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
