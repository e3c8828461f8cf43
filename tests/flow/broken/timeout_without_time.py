"""Broken at import: @timeout() with no time."""

from millstream import FlowSpec, Parameter, step, timeout


class TimeoutWithoutTimeFlow(FlowSpec):
    """A timeout of nothing."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.next(self.end)

    @timeout()  # <- error
    @step
    def end(self):
        """Last step."""
