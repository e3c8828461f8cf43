"""Broken: self.next(foreach=...) names its list with a variable, not a literal."""

from millstream import FlowSpec, Parameter, step


class ForeachNonLiteralFlow(FlowSpec):
    """The graph cannot know what to fan out over."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """The foreach."""
        self.items = list(range(self.size))
        name = "items"
        self.next(self.body, foreach=name)  # <- error

    @step
    def body(self):
        """One task per item."""
        self.next(self.join)

    @step
    def join(self, inputs):
        """Fan in."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
