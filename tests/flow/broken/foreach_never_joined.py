"""Broken: a foreach whose tasks run into end without a join."""

from millstream import FlowSpec, Parameter, step


class ForeachNeverJoinedFlow(FlowSpec):
    """Fans out and never fans in."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """The foreach."""
        self.items = list(range(self.size))
        self.next(self.body, foreach="items")  # <- error

    @step
    def body(self):
        """One task per item."""
        self.value = self.input
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
