"""Parameters of every kind, including a computed default and a JSON value."""

from millstream import FlowSpec, JSONType, Parameter, current, step


def default_greeting(context):
    """A default computed when the run is submitted."""
    return f"hello from {context.user_name}"


class ParameterFlow(FlowSpec):
    """Show how parameters reach every step."""

    alpha = Parameter("alpha", default=0.5, help="learning rate")
    epochs = Parameter("epochs", default=3, help="training epochs")
    verbose = Parameter("verbose", default=False, type=bool, help="print more")
    config = Parameter("config", default='{"layers": [8, 4]}', type=JSONType, help="model config")
    greeting = Parameter("greeting", default=default_greeting, help="a computed default")

    @step
    def start(self):
        """Use the parameters."""
        print(f"parameters: {current.parameter_names}")
        self.schedule = [self.alpha / (1 + e) for e in range(self.epochs)]
        self.next(self.end)

    @step
    def end(self):
        """They are visible in every step."""
        print(self.greeting, self.schedule, self.config["layers"], self.verbose)


if __name__ == "__main__":
    ParameterFlow()
