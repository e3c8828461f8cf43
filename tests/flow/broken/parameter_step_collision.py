"""Broken: a Parameter and a step share a name (the step silently replaces it)."""

from millstream import FlowSpec, Parameter, step


class ParameterStepCollisionFlow(FlowSpec):
    """greet is both a parameter and a step."""

    greet = Parameter("greet", default="hello")

    @step
    def start(self):
        """First step."""
        self.next(self.greet)

    @step
    def greet(self):  # noqa: F811  # <- error
        """Replaces the parameter of the same name."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
