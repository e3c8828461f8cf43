"""A foreach that fails where MS_FAIL says: "work:3", "join", "end" or "start"."""

import os

from millstream import FlowSpec, Parameter, current, step


def _fails(where: str) -> bool:
    return where in os.environ.get("MS_FAIL", "").split(",")


class ResumableFlow(FlowSpec):
    """start -> work (foreach) -> join -> end."""

    width = Parameter("width", default=6, help="number of splits")

    @step
    def start(self):
        """Fan out."""
        if _fails("start"):
            raise RuntimeError("start fails on purpose")
        self.items = list(range(self.width))
        self.next(self.work, foreach="items")

    @step
    def work(self):
        """One split."""
        if _fails(f"work:{self.input}"):
            raise RuntimeError(f"split {self.input} fails on purpose")
        self.value = self.input * 10
        self.ran_in = current.run_id
        self.next(self.join)

    @step
    def join(self, inputs):
        """Sum, and remember where each split ran."""
        if _fails("join"):
            raise RuntimeError("join fails on purpose")
        self.total = sum(i.value for i in inputs)
        self.split_runs = [i.ran_in for i in inputs]
        self.next(self.end)

    @step
    def end(self):
        """Report."""
        if _fails("end"):
            raise RuntimeError("end fails on purpose")
        self.origin_seen = current.origin_run_id
        self.end_ran_in = current.run_id


if __name__ == "__main__":
    ResumableFlow()
