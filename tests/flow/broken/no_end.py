"""Broken: the flow has no end step (it loops through a switch instead)."""

from millstream import FlowSpec, Parameter, step


class NoEndFlow(FlowSpec):  # <- error
    """Never finishes."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.route = "again"
        self.next(self.spin)

    @step
    def spin(self):
        """Goes round and round."""
        self.next({"again": self.spin, "still": self.spin}, condition="route")
