"""Broken: a step takes inputs but no split precedes it."""

from millstream import FlowSpec, Parameter, step


class InputsNotJoinFlow(FlowSpec):
    """A join with nothing to join."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.next(self.middle)

    @step
    def middle(self, inputs):  # <- error
        """Not a join."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
