"""A step that outlives its @timeout."""

import time

from millstream import FlowSpec, step, timeout


class TimeoutFlow(FlowSpec):
    """The slow step is stopped after one second."""

    @step
    def start(self):
        """Nothing to do."""
        self.next(self.slow)

    @timeout(seconds=1)
    @step
    def slow(self):
        """Sleeps far longer than allowed."""
        time.sleep(30)
        self.next(self.end)

    @step
    def end(self):
        """Never reached."""


if __name__ == "__main__":
    TimeoutFlow()
