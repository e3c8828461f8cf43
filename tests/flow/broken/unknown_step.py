"""Broken: a transition to a step that does not exist."""

from millstream import FlowSpec, Parameter, step


class UnknownStepFlow(FlowSpec):
    """Goes to a misspelt step."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.next(self.middel)  # <- error

    @step
    def middle(self):
        """The step start meant."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
