"""A plugin job kind for the job-system tests (loaded through ``FLYWHEEL_PLUGINS``): it
counts up, logging and reporting progress, until done, cancelled or told to fail or crash."""

from __future__ import annotations

import os
import time
from typing import Any

from flywheel.errors import ServiceError
from flywheel.jobs import JobContext, JobKind, register_job_kind


def _validate(params: dict[str, Any]) -> dict[str, Any]:
    steps = params.get("steps", 5)
    if not isinstance(steps, int) or not 1 <= steps <= 100_000:
        raise ServiceError(400, "params.steps: 1 to 100000", "invalid_value", "params.steps")
    return {
        "steps": steps,
        "delay": float(params.get("delay", 0.05)),
        "fail_at": params.get("fail_at"),
        "crash_at": params.get("crash_at"),
        "timeout": params.get("timeout"),
    }


def _run(ctx: JobContext) -> dict[str, Any]:
    steps = ctx.params["steps"]
    for step in range(1, steps + 1):
        if ctx.cancelled():
            ctx.log(f"stopping at step {step}")
            return {"reached": step - 1}
        if step == ctx.params.get("fail_at"):
            raise ValueError(f"told to fail at step {step}")
        if step == ctx.params.get("crash_at"):
            os._exit(9)  # a native crash: no status written
        print(f"step {step} of {steps}")
        ctx.progress(step / steps, f"step {step}")
        time.sleep(ctx.params["delay"])
    return {"reached": steps}


register_job_kind(JobKind("test.count", _run, _validate, "Counts up (job-system tests)."))
