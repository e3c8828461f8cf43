"""Broken: a join whose inputs come from two different splits."""

from millstream import FlowSpec, Parameter, step


class JoinDifferentSplitsFlow(FlowSpec):
    """Joins an inner branch with an outer one."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """The outer split."""
        self.next(self.a, self.b)

    @step
    def a(self):
        """The inner split."""
        self.next(self.a1, self.a2)

    @step
    def a1(self):
        """Inner branch one."""
        self.next(self.join)

    @step
    def a2(self):
        """Inner branch two."""
        self.next(self.join)

    @step
    def b(self):
        """Outer branch."""
        self.next(self.join)

    @step
    def join(self, inputs):  # <- error
        """Mixes the two splits."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
