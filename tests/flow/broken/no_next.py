"""Broken: a step that does not end with self.next."""

from millstream import FlowSpec, Parameter, step


class NoNextFlow(FlowSpec):
    """The middle step forgets its transition."""

    size = Parameter("size", default=1)

    @step
    def start(self):
        """First step."""
        self.next(self.middle)

    @step
    def middle(self):  # <- error
        """No self.next here."""
        self.value = self.size

    @step
    def end(self):
        """Last step."""
