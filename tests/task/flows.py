"""Small flows for the task-runner tests, each aimed at one behaviour of the runner.

The tests load this file the way a task process does (``load_flow_class`` on the
code package directory), so these classes are never imported by the tests directly.
"""

import sys
import threading
import time

from millstream import FlowSpec, Parameter, catch, current, retry, step, timeout


class ParamsFlow(FlowSpec):
    """Every step records the parameters it sees."""

    alpha = Parameter("alpha", default=0.5)
    label = Parameter("label", default="x")

    @step
    def start(self):
        """First sight."""
        self.seen = [("start", self.alpha, self.label)]
        self.next(self.middle)

    @step
    def middle(self):
        """Second sight."""
        self.seen = [*self.seen, ("middle", self.alpha, self.label)]
        self.next(self.end)

    @step
    def end(self):
        """Last sight."""
        self.seen = [*self.seen, ("end", self.alpha, self.label)]


class AssignParamFlow(FlowSpec):
    """A step that tries to change a parameter (past the graph check, with setattr)."""

    alpha = Parameter("alpha", default=0.5)

    @step
    def start(self):
        """Not allowed."""
        setattr(self, "alpha", 2.0)  # noqa: B010 - the graph only sees `self.alpha = ...`
        self.next(self.end)

    @step
    def end(self):
        """Never reached."""


class CatchFlow(FlowSpec):
    """A failing step under @catch: the flow goes on with the exception stored."""

    @step
    def start(self):
        """Nothing yet."""
        self.next(self.risky)

    @catch(var="err", print_exception=False)
    @step
    def risky(self):
        """Always fails."""
        self.partial = "set before the error"
        raise ValueError("risky went wrong")
        self.next(self.after)

    @step
    def after(self):
        """Look at what was caught."""
        self.report = (self.err.type, self.err.message, self.partial)
        self.next(self.end)

    @step
    def end(self):
        """Done."""


class RetryCatchFlow(FlowSpec):
    """@catch under @retry: only the last attempt's failure is caught."""

    @retry(times=1, minutes_between_retries=0)
    @catch(var="err", print_exception=False)
    @step
    def start(self):
        """Always fails, naming the attempt."""
        raise ValueError(f"attempt {current.retry_count} failed")
        self.next(self.end)

    @step
    def end(self):
        """Done."""


class FlakyFlow(FlowSpec):
    """Fails on its first attempt only."""

    @retry(times=2, minutes_between_retries=0)
    @step
    def start(self):
        """Succeeds on retry."""
        if current.retry_count == 0:
            raise RuntimeError("first attempt fails")
        self.succeeded_on = current.retry_count
        self.next(self.end)

    @step
    def end(self):
        """Done."""


class SlowFlow(FlowSpec):
    """A step that outlives its @timeout."""

    @timeout(seconds=1)
    @step
    def start(self):
        """Too slow."""
        time.sleep(5)
        self.next(self.end)

    @step
    def end(self):
        """Never reached."""


class SlowCaughtFlow(FlowSpec):
    """A step that outlives its @timeout, under @catch."""

    @catch(var="timeout_error", print_exception=False)
    @timeout(seconds=1)
    @step
    def start(self):
        """Too slow."""
        time.sleep(5)
        self.next(self.end)

    @step
    def end(self):
        """Reached: the timeout was caught."""


class WrongNextFlow(FlowSpec):
    """The source ends with self.next(self.a), but at run time the step goes to b."""

    shortcut = Parameter("shortcut", default=True)

    @retry(times=3, minutes_between_retries=0)
    @step
    def start(self):
        """Takes a path its source does not declare."""
        if self.shortcut:
            self.next(self.b)
            return
        self.next(self.a)

    @step
    def a(self):
        """The declared way."""
        self.next(self.b)

    @step
    def b(self):
        """The way actually taken."""
        self.next(self.end)

    @step
    def end(self):
        """Done."""


class NotIterableFlow(FlowSpec):
    """A foreach over an int."""

    @step
    def start(self):
        """Not a list."""
        self.items = 5
        self.next(self.body, foreach="items")

    @step
    def body(self):
        """Never reached."""
        self.next(self.join)

    @step
    def join(self, inputs):
        """Never reached."""
        self.next(self.end)

    @step
    def end(self):
        """Never reached."""


class LockFlow(FlowSpec):
    """An artifact that cannot be pickled: a lock."""

    @step
    def start(self):
        """Store a lock."""
        self.fine = 1
        self.guard = threading.Lock()
        self.next(self.end)

    @step
    def end(self):
        """Never reached."""


class LambdaFlow(FlowSpec):
    """An artifact that cannot be pickled: a lambda."""

    @step
    def start(self):
        """Store a lambda."""
        self.square = lambda x: x * x
        self.next(self.end)

    @step
    def end(self):
        """Never reached."""


class LazyFlow(FlowSpec):
    """A step that reads one inherited artifact and ignores another."""

    @step
    def start(self):
        """Two artifacts."""
        self.big = list(range(10_000))
        self.counter = 1
        self.next(self.middle)

    @step
    def middle(self):
        """Changes counter, never touches big."""
        self.counter += 1
        self.next(self.end)

    @step
    def end(self):
        """Done."""


class NoisyFlow(FlowSpec):
    """Output on both streams, then a failure."""

    @step
    def start(self):
        """Print, then fail."""
        print("to stdout")
        print("to stderr", file=sys.stderr)
        raise ValueError("noisy failure")
        self.next(self.end)

    @step
    def end(self):
        """Never reached."""
