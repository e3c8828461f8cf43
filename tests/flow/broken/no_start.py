"""Broken: the flow has no start step."""

from millstream import FlowSpec, Parameter, step


class NoStartFlow(FlowSpec):  # <- error
    """Begins at a step that is not called start."""

    size = Parameter("size", default=1)

    @step
    def begin(self):
        """Would be the first step."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
