"""A step that prints, then waits until the file named by MS_GO exists (at most 60 s)."""

import os
import time

from millstream import FlowSpec, step


class WaitingFlow(FlowSpec):
    """start -> wait -> end."""

    @step
    def start(self):
        """Nothing to do."""
        self.next(self.wait)

    @step
    def wait(self):
        """Say something, then hold until told to go on."""
        print("waiting for the go", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(os.environ["MS_GO"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        print("going on", flush=True)
        self.next(self.end)

    @step
    def end(self):
        """Done."""


if __name__ == "__main__":
    WaitingFlow()
