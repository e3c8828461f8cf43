"""Local start, a foreach on Batch (one array job), local join: the hybrid run."""

import os

from millstream import FlowSpec, Parameter, batch, step


class HybridFlow(FlowSpec):
    """Squares numbers on Batch."""

    width = Parameter("width", default=5)

    @step
    def start(self):
        """Locally: the splits."""
        self.items = list(range(self.width))
        self.start_job = os.environ.get("AWS_BATCH_JOB_ID")
        self.next(self.square, foreach="items")

    @batch(cpu=1, memory=1024)
    @step
    def square(self):
        """On Batch: one child of the array job per split."""
        self.job_id = os.environ.get("AWS_BATCH_JOB_ID")
        self.array_index = os.environ.get("AWS_BATCH_JOB_ARRAY_INDEX")
        print(f"squaring {self.input} on {self.job_id}")
        self.value = self.input * self.input
        self.next(self.join)

    @step
    def join(self, inputs):
        """Locally again."""
        self.values = [i.value for i in inputs]
        self.jobs = [i.job_id for i in inputs]
        self.indexes = [i.array_index for i in inputs]
        self.join_job = os.environ.get("AWS_BATCH_JOB_ID")
        self.next(self.end)

    @step
    def end(self):
        """Done."""
        print("total", sum(self.values))


if __name__ == "__main__":
    HybridFlow()
