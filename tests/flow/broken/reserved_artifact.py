"""Broken: a step assigns an artifact with a reserved name."""

from millstream import FlowSpec, Parameter, step


class ReservedArtifactFlow(FlowSpec):
    """Sets self.index."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.index = 1  # <- error
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
