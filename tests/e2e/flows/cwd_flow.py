"""Reads a file relative to where the user ran the flow, as a Metaflow step may."""

from millstream import FlowSpec, step


class CwdFlow(FlowSpec):
    """A relative path in a step means what it meant where `run` was typed."""

    @step
    def start(self):
        """Read input.txt from the working directory."""
        with open("input.txt", encoding="utf-8") as f:
            self.text = f.read().strip()
        self.next(self.end)

    @step
    def end(self):
        """Done."""


if __name__ == "__main__":
    CwdFlow()
