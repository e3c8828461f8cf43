"""Well-formed flows beyond the examples, for the graph tests."""

from millstream import FlowSpec, Parameter, catch, environment, retry, schedule, step, timeout


class RecursionFlow(FlowSpec):
    """A switch case points back to an earlier step: a loop until done."""

    limit = Parameter("limit", default=3)

    @step
    def start(self):
        """Set the counter."""
        self.count = 0
        self.next(self.work)

    @step
    def work(self):
        """One round."""
        self.count += 1
        self.next(self.check)

    @step
    def check(self):
        """Loop or stop."""
        self.verdict = "again" if self.count < self.limit else "done"
        self.next({"again": self.work, "done": self.end}, condition="verdict")

    @step
    def end(self):
        """Done."""


class SelfLoopFlow(FlowSpec):
    """A switch whose case is the switch step itself."""

    @step
    def start(self):
        """Set the counter."""
        self.count = 0
        self.next(self.poll)

    @step
    def poll(self):
        """Poll until ready."""
        self.count += 1
        self.state = "ready" if self.count > 2 else "waiting"
        self.next({"waiting": self.poll, "ready": self.end}, condition="state")

    @step
    def end(self):
        """Done."""


class SwitchMergeFlow(FlowSpec):
    """The cases of a switch meet again at a plain step, which takes no inputs."""

    @step
    def start(self):
        """Choose."""
        self.route = "a"
        self.next({"a": self.a, "b": self.b, "skip": self.merge}, condition="route")

    @step
    def a(self):
        """Case a."""
        self.next(self.merge)

    @step
    def b(self):
        """Case b."""
        self.next(self.merge)

    @step
    def merge(self):
        """Only one case ran, so this is no join."""
        self.next(self.end)

    @step
    def end(self):
        """Done."""


class BranchInForeachFlow(FlowSpec):
    """A static branch inside each task of a foreach, with a switch in one branch."""

    @step
    def start(self):
        """Fan out."""
        self.items = [1, 2]
        self.next(self.body, foreach="items")

    @step
    def body(self):
        """Split per item."""
        self.next(self.left, self.right)

    @step
    def left(self):
        """Branch one."""
        self.next(self.inner_join)

    @step
    def right(self):
        """Branch two: a switch whose cases re-merge before the join."""
        self.pick = "x"
        self.next({"x": self.right_x, "y": self.right_y}, condition="pick")

    @step
    def right_x(self):
        """Case x."""
        self.next(self.inner_join)

    @step
    def right_y(self):
        """Case y."""
        self.next(self.inner_join)

    @step
    def inner_join(self, inputs):
        """Close the branch."""
        self.next(self.outer_join)

    @step
    def outer_join(self, inputs):
        """Close the foreach."""
        self.next(self.end)

    @step
    def end(self):
        """Done."""


@schedule(cron="*/5 * * * *")
class DecoratedFlow(FlowSpec):
    """Step and flow decorators end up in the graph and its JSON."""

    @retry(times=2, minutes_between_retries=0)
    @timeout(minutes=1)
    @step
    def start(self):
        """First."""
        self.next(self.end)

    @catch(var="error")
    @environment(vars={"MODE": "test"})
    @step
    def end(self):
        """Last."""
