"""Broken: a step nothing leads to."""

from millstream import FlowSpec, Parameter, step


class UnreachableFlow(FlowSpec):
    """Has an orphan step."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.next(self.end)

    @step
    def orphan(self):  # <- error
        """Nothing goes here."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
