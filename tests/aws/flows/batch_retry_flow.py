"""A Batch step that fails twice, then succeeds under @retry; and one that eats memory."""

from millstream import FlowSpec, Parameter, batch, current, retry, step


class BatchRetryFlow(FlowSpec):
    """Retries on Batch."""

    hog_mb = Parameter("hog_mb", default=0)

    @step
    def start(self):
        """Locally."""
        self.next(self.flaky)

    @retry(times=2, minutes_between_retries=0)
    @batch(cpu=1, memory=1024)
    @step
    def flaky(self):
        """Fails on attempts 0 and 1."""
        print(f"attempt {current.retry_count}")
        if current.retry_count < 2:
            raise RuntimeError(f"attempt {current.retry_count} fails on purpose")
        self.attempt_seen = current.retry_count
        self.next(self.hog)

    @batch(cpu=1, memory=300)
    @step
    def hog(self):
        """Holds ``hog_mb`` MiB: more than its 300 MiB is killed like Batch kills it."""
        import time

        held = bytearray(self.hog_mb * 1024 * 1024)
        for i in range(0, len(held), 4096):
            held[i] = 1
        time.sleep(2 if self.hog_mb else 0)
        self.next(self.end)

    @step
    def end(self):
        """Done."""


if __name__ == "__main__":
    BatchRetryFlow()
