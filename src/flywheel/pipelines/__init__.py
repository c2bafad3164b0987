"""Declarative YAML pipelines: retrieve, call models and prompts, parse, call tools, branch and
map, traced step by step. :mod:`.spec` validates a pipeline, :mod:`.runner` runs it against a
host (the server's gateway and knowledge bases), :mod:`.tools` holds the Python tools."""

from flywheel.pipelines.runner import (
    PipelineHost,
    PipelineInputError,
    PipelineRun,
    PipelineRunner,
    PipelineStepError,
    StepRecord,
)
from flywheel.pipelines.spec import (
    PipelineSpec,
    PipelineSpecError,
    parse_pipeline,
    validate_pipeline,
)
from flywheel.pipelines.tools import (
    ToolFunction,
    UnknownToolError,
    get_tool,
    register_tool,
    tool_names,
)

__all__ = [
    "PipelineHost",
    "PipelineInputError",
    "PipelineRun",
    "PipelineRunner",
    "PipelineSpec",
    "PipelineSpecError",
    "PipelineStepError",
    "StepRecord",
    "ToolFunction",
    "UnknownToolError",
    "get_tool",
    "parse_pipeline",
    "register_tool",
    "tool_names",
    "validate_pipeline",
]
