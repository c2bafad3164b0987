"""flywheel.yaml: validation errors name the file, the line and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.config import ConfigError, load_config, load_config_text

BAD = """\
providers:
  local: {type: local}
  remote: {type: openai}
models:
  - name: a
    provider: local
  - name: b
    provider: nowhere
    pricing: {input_per_mtok: -1}
routes:
  - name: r
    targets:
      - model: missing
        weight: 0
    colour: blue
"""


def test_errors_name_file_line_and_problem() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(BAD, "conf/flywheel.yaml")
    problems = info.value.problems
    assert "conf/flywheel.yaml:3: providers.remote: an 'openai' provider needs base_url" in problems
    assert any(
        p.startswith("conf/flywheel.yaml:9: models[1].pricing.input_per_mtok:") for p in problems
    )
    assert any(
        p.startswith("conf/flywheel.yaml:14: routes[0].targets[0].weight:") for p in problems
    )
    assert any(
        p.startswith("conf/flywheel.yaml:15: routes[0].colour: Extra inputs") for p in problems
    )


def test_reference_errors_have_lines() -> None:
    text = "providers:\n  local: {type: local}\nmodels:\n  - name: b\n    provider: nowhere\nroutes:\n  - name: r\n    targets: [{model: gone}]\n    fallbacks: [b, also-gone]\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    assert info.value.problems == [
        "flywheel.yaml:5: models[0].provider: unknown provider 'nowhere'",
        "flywheel.yaml:8: routes[0].targets[0].model: unknown model 'gone'",
        "flywheel.yaml:9: routes[0].fallbacks[1]: unknown model 'also-gone'",
    ]


def test_yaml_syntax_error_has_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("routes:\n  - name: [unclosed\n", "x.yaml")
    assert info.value.problems[0].startswith("x.yaml:3: invalid YAML")


def test_builtin_defaults_are_valid() -> None:
    config = load_config(None)
    assert [r.name for r in config.routes] == ["default"]
    assert {m.kind for m in config.models} == {"chat", "embedding"}


def test_cli_config_check(tmp_path: Path) -> None:
    bad = tmp_path / "flywheel.yaml"
    bad.write_text(BAD)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "flywheel"), "config", "check", "-f", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert f"{bad}:14: routes[0].targets[0].weight" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text("providers: {local: {type: local}}\nmodels: [{name: m, provider: local}]\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "flywheel"), "config", "check", "-f", str(good)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "1 models" in result.stdout


CATALOG_STATUS = """\
providers:
  up: {type: openai, base_url: "http://127.0.0.1:9/v1"}
models:
  - {name: good, provider: up}
  - {name: trial, provider: up, status: experimental}
  - {name: banned, provider: up, status: blocked}
routes:
  - name: prod
    production: true
    targets: [{model: good}]
    fallbacks: [trial]
  - name: dev
    targets: [{model: banned}]
  - name: dev-ok
    targets: [{model: trial}]
"""


def test_catalog_status_limits_what_routes_may_target() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(CATALOG_STATUS, "flywheel.yaml")
    problems = info.value.problems
    assert (
        "flywheel.yaml:11: routes[0].fallbacks[0]: production route 'prod' may only target "
        "approved models; 'trial' is experimental"
    ) in problems
    assert (
        "flywheel.yaml:13: routes[1].targets[0].model: model 'banned' is blocked in the catalog"
        in (problems)
    )
    assert len(problems) == 2  # an experimental model in a non-production route is fine
