"""A foreach inside a foreach, with retry and catch on the inner steps."""

from millstream import FlowSpec, catch, retry, step


class NestedForeachFlow(FlowSpec):
    """A grid search: every model against every fold."""

    @step
    def start(self):
        """The outer list."""
        self.models = ["a", "b", "c"]
        self.next(self.per_model, foreach="models")

    @step
    def per_model(self):
        """The inner list, per model."""
        self.model = self.input
        self.folds = [1, 2]
        self.next(self.fit, foreach="folds")

    @retry(times=1, minutes_between_retries=0)
    @catch(var="fit_error")
    @step
    def fit(self):
        """One model on one fold."""
        (model_i, _, _), (_, _, fold) = self.foreach_stack()
        self.score = (model_i + 1) * 10 + fold
        self.next(self.per_model_join)

    @step
    def per_model_join(self, inputs):
        """Scores of one model."""
        self.model = inputs[0].model
        self.scores = [inp.score for inp in inputs]
        self.next(self.join)

    @step
    def join(self, inputs):
        """All the scores."""
        self.table = {inp.model: inp.scores for inp in inputs}
        self.next(self.end)

    @step
    def end(self):
        """Show them."""
        print(self.table)


if __name__ == "__main__":
    NestedForeachFlow()
