"""Broken: the same step is defined twice."""

from millstream import FlowSpec, Parameter, step


class StepDefinedTwiceFlow(FlowSpec):
    """The second middle replaces the first."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.next(self.middle)

    @step
    def middle(self):
        """First definition."""
        self.next(self.end)

    @step
    def middle(self):  # noqa: F811  # <- error
        """Second definition."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
