"""A foreach fan-out over a list, processed in parallel and summed in a join."""

from millstream import FlowSpec, Parameter, step


class ForeachFlow(FlowSpec):
    """Square every number, then add the squares up."""

    count = Parameter("count", default=20, help="how many numbers to fan out over")

    @step
    def start(self):
        """Make the work list."""
        self.numbers = list(range(self.count))
        self.next(self.square, foreach="numbers")

    @step
    def square(self):
        """One task per number."""
        self.value = self.input * self.input
        self.next(self.join)

    @step
    def join(self, inputs):
        """Add up what the tasks produced."""
        self.total = sum(inp.value for inp in inputs)
        self.next(self.end)

    @step
    def end(self):
        """Check the result."""
        expected = sum(n * n for n in range(self.count))
        assert self.total == expected, (self.total, expected)
        print(f"sum of squares below {self.count}: {self.total}")


if __name__ == "__main__":
    ForeachFlow()
