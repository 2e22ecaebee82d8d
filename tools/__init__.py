"""The agent-facing operations. MCP, REST and the CLI all call these plain functions.

`launch_training` has a module of its own; the small read-and-control tools that share one
object (jobs, datasets, models, quota) sit one module per object, so their views stay together.
Every function takes the `ServiceContext`, the calling `Agent`, and a pydantic request, and
returns a pydantic result; errors are `server.errors.WeightsmithError`s whose message says what
to change.
"""
