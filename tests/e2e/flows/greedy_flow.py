"""A step asking for more cores than any laptop has."""

from millstream import FlowSpec, resources, step


class GreedyFlow(FlowSpec):
    """Refused at submission."""

    @resources(cpu=4096)
    @step
    def start(self):
        """Never runs."""
        self.next(self.end)

    @step
    def end(self):
        """Never runs."""


if __name__ == "__main__":
    GreedyFlow()
