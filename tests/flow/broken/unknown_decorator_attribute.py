"""Broken at import: @retry(tims=2), a misspelt attribute."""

from millstream import FlowSpec, Parameter, retry, step


class UnknownDecoratorAttributeFlow(FlowSpec):
    """tims is not times."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.next(self.end)

    @retry(tims=2)  # <- error
    @step
    def end(self):
        """Last step."""
