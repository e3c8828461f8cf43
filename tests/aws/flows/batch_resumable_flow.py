"""A hybrid run whose local join is broken until the code is fixed (``BROKEN``)."""

import os

from millstream import FlowSpec, Parameter, batch, current, step

BROKEN = True
OFFSET = 0


class BatchResumableFlow(FlowSpec):
    """Squares numbers on Batch, sums them locally."""

    width = Parameter("width", default=4)

    @step
    def start(self):
        """Locally: the splits."""
        self.items = list(range(self.width))
        self.next(self.square, foreach="items")

    @batch(cpu=1, memory=1024)
    @step
    def square(self):
        """On Batch: one child of the array job per split."""
        self.job_id = os.environ.get("AWS_BATCH_JOB_ID")
        self.run_seen = current.run_id
        self.value = self.input * self.input + OFFSET
        self.next(self.join)

    @step
    def join(self, inputs):
        """Locally; raises while the code is broken."""
        if BROKEN:
            raise RuntimeError("the join is broken")
        self.values = [i.value for i in inputs]
        self.jobs = [i.job_id for i in inputs]
        self.split_runs = [i.run_seen for i in inputs]
        self.next(self.end)

    @step
    def end(self):
        """Done."""
        self.origin_seen = current.origin_run_id
        print("total", sum(self.values))


if __name__ == "__main__":
    BatchResumableFlow()
