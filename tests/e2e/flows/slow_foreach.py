"""A foreach whose splits take a while: the crash tests kill the daemon mid-way."""

import os
import time

from millstream import FlowSpec, Parameter, current, step


class SlowForeachFlow(FlowSpec):
    """Each split sleeps, records its pid, and returns its square."""

    width = Parameter("width", default=12, help="number of splits")
    nap = Parameter("nap", default=0.4, help="seconds each split sleeps")

    @step
    def start(self):
        """Fan out."""
        self.items = list(range(self.width))
        self.next(self.work, foreach="items")

    @step
    def work(self):
        """Sleep, then compute."""
        time.sleep(self.nap)
        self.value = self.input * self.input
        self.pid = os.getpid()
        self.next(self.join)

    @step
    def join(self, inputs):
        """Sum the squares."""
        time.sleep(self.nap)
        self.total = sum(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        """Report."""
        print("total", self.total, current.run_id)


if __name__ == "__main__":
    SlowForeachFlow()
