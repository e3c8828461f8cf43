"""Broken: self.next is not the last statement of the step."""

from millstream import FlowSpec, Parameter, step


class NextNotLastFlow(FlowSpec):
    """Does work after choosing the next step."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.next(self.end)  # <- error
        self.value = self.size

    @step
    def end(self):
        """Last step."""
