"""The smallest flow: start, one step, end."""

from millstream import FlowSpec, current, step


class HelloFlow(FlowSpec):
    """Say hello and pass a message along."""

    @step
    def start(self):
        """Set a message."""
        self.message = "hello"
        print(f"{current.flow_name} run {current.run_id} starting")
        self.next(self.greet)

    @step
    def greet(self):
        """Add to it."""
        self.message += ", world"
        print(self.message)
        self.next(self.end)

    @step
    def end(self):
        """Show the result."""
        print("done:", self.message)


if __name__ == "__main__":
    HelloFlow()
