"""The authoring API: FlowSpec, step, decorators, Parameter, current and the graph."""
