"""The deployment examples in deploy/ and docs/deploy.md stay valid as the config schema
changes: every Flywheel config loads, the compose files are consistent, nginx names the
compose file's gateways."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

CHECKER = Path(__file__).resolve().parent.parent / "deploy" / "check_examples.py"


def test_the_deployment_examples_check_clean(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("check_examples", CHECKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == 0, capsys.readouterr().out
