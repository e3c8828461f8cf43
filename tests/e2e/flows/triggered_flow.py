"""Starts when a HelloFlow run succeeds."""

from millstream import FlowSpec, current, step, trigger_on_finish


@trigger_on_finish(flow="HelloFlow")
class TriggeredFlow(FlowSpec):
    """Records what triggered it."""

    @step
    def start(self):
        """Look at current.trigger."""
        self.trigger_pathspec = current.trigger.pathspec
        self.production = current.is_production
        self.next(self.end)

    @step
    def end(self):
        """Done."""


if __name__ == "__main__":
    TriggeredFlow()
