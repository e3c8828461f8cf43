"""Broken: a loop that does not go through a switch."""

from millstream import FlowSpec, Parameter, step


class CycleFlow(FlowSpec):
    """a -> b -> a with plain transitions."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.next(self.a)

    @step
    def a(self):
        """Top of the loop."""
        self.next(self.b)

    @step
    def b(self):
        """Back to the top, and also onwards."""
        self.next(self.a, self.end)  # <- error

    @step
    def end(self):
        """Last step."""
