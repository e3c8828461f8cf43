"""Broken at import: @retry(times=-1)."""

from millstream import FlowSpec, Parameter, retry, step


class RetryNegativeFlow(FlowSpec):
    """A negative number of retries."""

    size = Parameter("size", default=1)

    @retry(times=-1)  # <- error
    @step
    def start(self):
        """First step."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
