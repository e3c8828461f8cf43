"""Broken: a step assigns to a parameter."""

from millstream import FlowSpec, Parameter, step


class AssignsParameterFlow(FlowSpec):
    """Tries to change alpha."""

    alpha = Parameter("alpha", default=0.5)

    @step
    def start(self):
        """First step."""
        self.alpha = 0.1  # <- error
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
