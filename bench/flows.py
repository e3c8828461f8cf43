"""The benchmark flows, written out twice: once for millstream, once for Metaflow.

Each flow has trivial step bodies, so a run's wall time is the scheduler's overhead:
launching tasks, moving artifacts, and following the run from the command line.
The two copies differ only in their import line.

    python bench/flows.py DIR     # writes DIR/millstream/*.py and DIR/metaflow/*.py
"""

from __future__ import annotations

import sys
from itertools import pairwise
from pathlib import Path

FRAMEWORKS = ("millstream", "metaflow")

_HEADER = '''"""{doc}"""

from {framework} import FlowSpec, step


class {cls}(FlowSpec):
    """{doc}"""
'''

_FOOTER = """

if __name__ == "__main__":
    {cls}()
"""


def _hello() -> str:
    return """
    @step
    def start(self):
        self.message = "hello"
        self.next(self.end)

    @step
    def end(self):
        assert self.message == "hello"
"""


def _linear(steps: int) -> str:
    names = ["start", *(f"s{i:02d}" for i in range(1, steps - 1)), "end"]
    body = []
    for name, following in pairwise(names):
        value = "0" if name == "start" else "self.count + 1"
        body.append(f"""
    @step
    def {name}(self):
        self.count = {value}
        self.next(self.{following})
""")
    body.append(f"""
    @step
    def end(self):
        assert self.count == {steps - 2}
""")
    return "".join(body)


def _sum_join(expected: int) -> str:
    """A join that sums its inputs' ``value``, and an end that checks the sum."""
    return f"""
    @step
    def join(self, inputs):
        self.total = sum(inp.value for inp in inputs)
        self.next(self.end)

    @step
    def end(self):
        assert self.total == {expected}
"""


def _branch(width: int) -> str:
    branches = [f"b{i}" for i in range(width)]
    targets = ", ".join(f"self.{b}" for b in branches)
    body = [
        f"""
    @step
    def start(self):
        self.seed = 1
        self.next({targets})
"""
    ]
    for i, name in enumerate(branches):
        body.append(f"""
    @step
    def {name}(self):
        self.value = self.seed + {i}
        self.next(self.join)
""")
    body.append(_sum_join(sum(1 + i for i in range(width))))
    return "".join(body)


def _foreach(width: int) -> str:
    return f"""
    @step
    def start(self):
        self.items = list(range({width}))
        self.next(self.double, foreach="items")

    @step
    def double(self):
        self.value = self.input * 2
        self.next(self.join)
""" + _sum_join(width * (width - 1))


# name -> (class name, docstring, body)
FLOWS: dict[str, tuple[str, str, str]] = {
    "hello": ("HelloFlow", "start -> end.", _hello()),
    "linear20": ("Linear20Flow", "Twenty steps in a line: start, 18 steps, end.", _linear(20)),
    "branch8": ("Branch8Flow", "start splits into 8 static branches, a join merges them, end.", _branch(8)),
    "foreach100": ("Foreach100Flow", "A foreach over 100 items, a join that sums them, end.", _foreach(100)),
    "foreach1000": ("Foreach1000Flow", "A foreach over 1000 items, a join that sums them, end.", _foreach(1000)),
}


def flow_source(name: str, framework: str) -> str:
    """The source of flow ``name`` importing ``FlowSpec`` and ``step`` from ``framework``."""
    cls, doc, body = FLOWS[name]
    return _HEADER.format(doc=doc, framework=framework, cls=cls) + body + _FOOTER.format(cls=cls)


def write_flows(root: Path, framework: str) -> dict[str, Path]:
    """Write every flow for ``framework`` under ``root/framework``; name -> file."""
    directory = root / framework
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in FLOWS:
        path = directory / f"{name}.py"
        path.write_text(flow_source(name, framework), encoding="utf-8")
        files[name] = path
    return files


def main(argv: list[str]) -> int:
    """Write both copies of every flow under the directory given."""
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for framework in FRAMEWORKS:
        for path in write_flows(Path(argv[0]), framework).values():
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
