"""The job-kind registry: every built-in kind is mapped to the module that registers it, and a
job process looking up its kind imports that module only."""

from __future__ import annotations

import json
import subprocess
import sys

from flywheel.jobs.kinds import BUILTIN_KINDS, job_kinds


def test_every_builtin_kind_is_mapped_to_the_module_that_registers_it() -> None:
    kinds = job_kinds()
    ours = {name: kind.run.__module__ for name, kind in kinds.items() if name in BUILTIN_KINDS}
    assert ours == BUILTIN_KINDS
    strays = [
        name
        for name, kind in kinds.items()
        if kind.run.__module__.startswith("flywheel.") and name not in BUILTIN_KINDS
    ]
    assert strays == [], "a stage registers a kind missing from BUILTIN_KINDS"


def test_looking_up_a_kind_imports_only_its_own_stage() -> None:
    code = (
        "import json, sys\n"
        "from flywheel.jobs.kinds import job_kind\n"
        "found = job_kind('eval.run')\n"
        "print(json.dumps({'found': found is not None, 'loaded': sorted(m for m in sys.modules "
        "if m in ('flywheel.tuning.jobs', 'flywheel.rag.jobs', 'flywheel.evals.jobs'))}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.splitlines()[-1]) == {
        "found": True,
        "loaded": ["flywheel.evals.jobs"],
    }
