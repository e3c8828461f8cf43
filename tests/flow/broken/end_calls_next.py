"""Broken: the end step calls self.next."""

from millstream import FlowSpec, Parameter, step


class EndCallsNextFlow(FlowSpec):
    """end tries to go on."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.next(self.end)

    @step
    def end(self):
        """Last step, but not content to be."""
        self.next(self.start)  # <- error
