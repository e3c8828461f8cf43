"""Two branches that each want every core of the host: they must not overlap."""

import time

from millstream import FlowSpec, Parameter, resources, step


class ResourcesFlow(FlowSpec):
    """Branches with @resources(cpu=...)."""

    cpu = Parameter("cpu", default=2, help="cores each branch asks for")

    @step
    def start(self):
        """Fan out to two heavy branches."""
        self.next(self.heavy_a, self.heavy_b)

    @resources(cpu=2, memory=100)
    @step
    def heavy_a(self):
        """Pretend to use both cores."""
        time.sleep(0.6)
        self.next(self.join)

    @resources(cpu=2, memory=100)
    @step
    def heavy_b(self):
        """Pretend to use both cores."""
        time.sleep(0.6)
        self.next(self.join)

    @step
    def join(self, inputs):
        """Nothing to merge."""
        self.next(self.end)

    @step
    def end(self):
        """Done."""


if __name__ == "__main__":
    ResourcesFlow()
