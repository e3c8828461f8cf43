"""A static branch: two steps run in parallel and a join merges their artifacts."""

from millstream import FlowSpec, step


class BranchFlow(FlowSpec):
    """Train two models side by side and keep the better one."""

    @step
    def start(self):
        """Shared input for both branches."""
        self.data = list(range(10))
        self.seed = 42
        self.next(self.linear_model, self.tree_model)

    @step
    def linear_model(self):
        """One branch."""
        self.score = sum(self.data) / len(self.data)
        self.model = "linear"
        self.next(self.pick)

    @step
    def tree_model(self):
        """The other branch."""
        self.score = max(self.data) / 2 + 1
        self.model = "tree"
        self.next(self.pick)

    @step
    def pick(self, inputs):
        """Keep the best; carry the artifacts both branches share."""
        best = max(inputs, key=lambda inp: inp.score)
        self.best_model, self.best_score = best.model, best.score
        self.scores = {inp.model: inp.score for inp in inputs}
        self.merge_artifacts(inputs, exclude=["score", "model"])
        self.next(self.end)

    @step
    def end(self):
        """Report."""
        print(f"best: {self.best_model} ({self.best_score}); all: {self.scores}; seed {self.seed}")


if __name__ == "__main__":
    BranchFlow()
