"""Broken: a step named like a FlowSpec member."""

from millstream import FlowSpec, Parameter, step


class ReservedStepNameFlow(FlowSpec):
    """Has a step called index."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.next(self.index)

    @step
    def index(self):  # <- error
        """Shadows FlowSpec.index."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
