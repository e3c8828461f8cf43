"""Broken: two branches arrive at a step that does not take inputs."""

from millstream import FlowSpec, Parameter, step


class JoinWithoutInputsFlow(FlowSpec):
    """The join forgot its inputs argument."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """The split."""
        self.next(self.a, self.b)

    @step
    def a(self):
        """Branch one."""
        self.next(self.join)

    @step
    def b(self):
        """Branch two."""
        self.next(self.join)

    @step
    def join(self):  # <- error
        """Should be def join(self, inputs)."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
