"""Fails on its first attempt, succeeds on the retry."""

from millstream import FlowSpec, current, retry, step


class RetryFlow(FlowSpec):
    """@retry then success."""

    @step
    def start(self):
        """Nothing to do."""
        self.next(self.flaky)

    @retry(times=2, minutes_between_retries=0)
    @step
    def flaky(self):
        """Fail the first time."""
        if current.retry_count == 0:
            raise RuntimeError("first attempt fails on purpose")
        self.attempt_seen = current.retry_count
        self.next(self.end)

    @step
    def end(self):
        """Done."""
        print("succeeded on attempt", self.attempt_seen)


if __name__ == "__main__":
    RetryFlow()
