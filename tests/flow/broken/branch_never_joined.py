"""Broken: the branches of a split run into end without a join."""

from millstream import FlowSpec, Parameter, step


class BranchNeverJoinedFlow(FlowSpec):
    """Two branches, no join."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """The split."""
        self.next(self.a, self.b)  # <- error

    @step
    def a(self):
        """Branch one."""
        self.next(self.end)

    @step
    def b(self):
        """Branch two."""
        self.next(self.end)

    @step
    def end(self):
        """Last step."""
