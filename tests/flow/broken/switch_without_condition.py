"""Broken: a switch without condition=."""

from millstream import FlowSpec, Parameter, step


class SwitchWithoutConditionFlow(FlowSpec):
    """Which branch? Nobody says."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """The switch."""
        self.route = "small"
        self.next({"small": self.small, "large": self.large})  # <- error

    @step
    def small(self):
        """One way."""
        self.next(self.end)

    @step
    def large(self):
        """The other way."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
