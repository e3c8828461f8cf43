"""Nested foreach and a switch; MS_FAIL names "fit:1-0" or "large"."""

import os

from millstream import FlowSpec, current, step


def _fails(where: str) -> bool:
    return where in os.environ.get("MS_FAIL", "").split(",")


class ResumableNestedFlow(FlowSpec):
    """start -> outer foreach -> inner foreach fit -> joins -> switch -> end."""

    @step
    def start(self):
        """Outer list."""
        self.groups = [0, 1]
        self.next(self.outer, foreach="groups")

    @step
    def outer(self):
        """Inner list."""
        self.parts = [0, 1]
        self.next(self.fit, foreach="parts")

    @step
    def fit(self):
        """One cell of the grid."""
        (g, _, _), (p, _, _) = self.foreach_stack()
        if _fails(f"fit:{g}-{p}"):
            raise RuntimeError("fit fails on purpose")
        self.cell = (g, p)
        self.ran_in = current.run_id
        self.next(self.inner_join)

    @step
    def inner_join(self, inputs):
        """Cells of one group."""
        self.cells = [i.cell for i in inputs]
        self.next(self.outer_join)

    @step
    def outer_join(self, inputs):
        """All cells; pick a route."""
        self.grid = [c for i in inputs for c in i.cells]
        self.route = "large" if len(self.grid) > 3 else "small"
        self.next({"small": self.small, "large": self.large}, condition="route")

    @step
    def small(self):
        """Not taken."""
        self.result = "small"
        self.next(self.end)

    @step
    def large(self):
        """Taken."""
        if _fails("large"):
            raise RuntimeError("large fails on purpose")
        self.result = "large"
        self.next(self.end)

    @step
    def end(self):
        """Done."""


if __name__ == "__main__":
    ResumableNestedFlow()
