"""A Batch step that prints, waits for a file to appear, and prints again."""

import os
import time

from millstream import FlowSpec, Parameter, batch, step


class TalkingFlow(FlowSpec):
    """Live logs from Batch."""

    release = Parameter("release", default="")

    @step
    def start(self):
        """Locally."""
        self.next(self.talk)

    @batch(cpu=1, memory=1024)
    @step
    def talk(self):
        """On Batch: one line, then another once the test lets it go."""
        print("first line", flush=True)
        deadline = time.time() + 60
        while not os.path.exists(self.release) and time.time() < deadline:
            time.sleep(0.05)
        print("second line", flush=True)
        self.next(self.end)

    @step
    def end(self):
        """Done."""


if __name__ == "__main__":
    TalkingFlow()
