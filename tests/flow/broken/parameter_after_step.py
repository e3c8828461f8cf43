"""Broken: a Parameter defined after a step of the same name replaces the step."""

from millstream import FlowSpec, Parameter, step


class ParameterAfterStepFlow(FlowSpec):
    """greet is a step, then a parameter."""

    @step
    def start(self):
        """First step."""
        self.next(self.greet)

    @step
    def greet(self):  # <- error
        """Replaced by the parameter below."""
        self.next(self.end)

    greet = Parameter("greet", default="hello")  # noqa: F811

    @step
    def end(self):
        """Last step."""
