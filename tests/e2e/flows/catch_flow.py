"""A failing step whose exception @catch keeps, and a step that always fails."""

from millstream import FlowSpec, Parameter, catch, step


class CatchFlow(FlowSpec):
    """@catch lets the run go on; without it the run fails."""

    fail_hard = Parameter("fail_hard", default=False, help="also fail a step without @catch")

    @step
    def start(self):
        """Branch into a caught and an uncaught path."""
        self.next(self.divide)

    @catch(var="divide_error", print_exception=False)
    @step
    def divide(self):
        """Raises ZeroDivisionError."""
        self.result = 1 / 0
        self.next(self.maybe_fail)

    @step
    def maybe_fail(self):
        """Fails when asked to."""
        if self.fail_hard:
            raise ValueError("asked to fail")
        self.next(self.end)

    @step
    def end(self):
        """Report the caught error."""
        print("caught:", self.divide_error.type)


if __name__ == "__main__":
    CatchFlow()
