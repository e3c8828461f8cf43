"""A switch: the value of an artifact picks which branch runs."""

from millstream import FlowSpec, Parameter, step


class SwitchFlow(FlowSpec):
    """Route small and large inputs to different steps."""

    size = Parameter("size", default=5, help="input size")

    @step
    def start(self):
        """Decide the route."""
        self.route = "large" if self.size > 100 else "small"
        self.next({"small": self.small, "large": self.large}, condition="route")

    @step
    def small(self):
        """Handle small inputs in memory."""
        self.result = f"in memory ({self.size})"
        self.next(self.end)

    @step
    def large(self):
        """Handle large inputs in chunks."""
        self.result = f"in chunks ({self.size})"
        self.next(self.end)

    @step
    def end(self):
        """Report which way the run went."""
        print(self.route, "->", self.result)


if __name__ == "__main__":
    SwitchFlow()
