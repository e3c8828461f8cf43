"""Broken: a Parameter's command-line name is the name of a step."""

from millstream import FlowSpec, Parameter, step


class ParameterCliNameCollisionFlow(FlowSpec):
    """--greet would name the step greet."""

    greeting = Parameter("greet", default="hello")

    @step
    def start(self):
        """First step."""
        self.next(self.greet)

    @step
    def greet(self):  # <- error
        """Same name as the parameter."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
