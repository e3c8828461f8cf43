"""Broken: a join that joins only two of the three branches of a split."""

from millstream import FlowSpec, Parameter, step


class JoinMissesBranchFlow(FlowSpec):
    """Branch c is joined on its own."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """The split."""
        self.next(self.a, self.b, self.c)

    @step
    def a(self):
        """Branch one."""
        self.next(self.join)

    @step
    def b(self):
        """Branch two."""
        self.next(self.join)

    @step
    def c(self):
        """Branch three, which misses the join."""
        self.next(self.join_c)

    @step
    def join(self, inputs):  # <- error
        """Joins a and b only."""
        self.next(self.end)

    @step
    def join_c(self, inputs):
        """Joins c only."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
