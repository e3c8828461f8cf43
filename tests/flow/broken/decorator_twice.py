"""Broken at import: the same decorator twice on one step."""

from millstream import FlowSpec, Parameter, retry, step


class DecoratorTwiceFlow(FlowSpec):
    """Two @retry on start."""

    size = Parameter("size", default=1)

    @retry(times=1)  # <- error
    @retry(times=2)
    @step
    def start(self):
        """First step."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
