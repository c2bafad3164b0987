"""Check the deployment examples: `python deploy/check_examples.py` (exit status 1 on a problem).

- every Flywheel config in deploy/ (``flywheel*.yaml``) and every YAML block in
  docs/deploy.md that has a ``providers``, ``models`` or ``routes`` section loads with
  Flywheel's own config loader (the one behind ``flywheel config check``);
- each compose file is YAML whose services name an image, whose ``depends_on`` and named
  volumes point at things the file defines, and whose bind mounts exist in deploy/;
- the nginx config names the same gateway services as the multi-node compose file.

It needs no Docker daemon; ``docker compose config`` remains the fuller check where one runs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from flywheel.config import ConfigError, load_config, load_config_text

DEPLOY = Path(__file__).resolve().parent
DOCS = DEPLOY.parent / "docs" / "deploy.md"
CONFIG_SECTIONS = {"providers", "models", "routes"}
_YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)


def check_flywheel_configs() -> list[str]:
    """Problems in the config files of deploy/ and the config blocks of docs/deploy.md."""
    problems: list[str] = []
    for path in sorted(DEPLOY.glob("flywheel*.yaml")):
        try:
            load_config(path)
        except ConfigError as exc:
            problems += exc.problems
    for number, block in enumerate(_YAML_BLOCK.findall(DOCS.read_text()), start=1):
        data = yaml.safe_load(block)
        if not isinstance(data, dict) or not CONFIG_SECTIONS & data.keys():
            continue
        try:
            load_config_text(block, f"docs/deploy.md yaml block {number}")
        except ConfigError as exc:
            problems += exc.problems
    return problems


def check_compose(path: Path) -> list[str]:
    """Problems in one compose file that a YAML parser and the file itself can reveal."""
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    services: dict[str, Any] = data.get("services") or {}
    volumes = set(data.get("volumes") or {})
    problems = [] if services else [f"{path.name}: no services"]
    for name, service in services.items():
        where = f"{path.name}: services.{name}"
        if not service.get("image"):
            problems.append(f"{where}: no image")
        for dependency in service.get("depends_on") or {}:
            if dependency not in services:
                problems.append(f"{where}.depends_on: no service '{dependency}'")
        for mount in service.get("volumes") or []:
            source = str(mount).split(":", 1)[0]
            if source.startswith("."):
                if not (path.parent / source).exists():
                    problems.append(f"{where}.volumes: {source} does not exist")
            elif source not in volumes:
                problems.append(f"{where}.volumes: named volume '{source}' is not declared")
    return problems


def check_nginx_upstreams(compose: Path, nginx: Path) -> list[str]:
    """The gateway services nginx balances over must be the compose file's gateways."""
    services = set(yaml.safe_load(compose.read_text()).get("services") or {})
    gateways = {s for s in services if re.fullmatch(r"flywheel-\d+", s)}
    upstreams = set(re.findall(r"^\s*server\s+(flywheel-\d+):8000", nginx.read_text(), re.M))
    if gateways != upstreams:
        return [f"nginx.conf balances {sorted(upstreams)}, compose runs {sorted(gateways)}"]
    return []


def main() -> int:
    """Run every check; print the problems; 0 when there are none."""
    problems = check_flywheel_configs()
    for compose in sorted(DEPLOY.glob("docker-compose*.yml")):
        problems += check_compose(compose)
    problems += check_nginx_upstreams(DEPLOY / "docker-compose.yml", DEPLOY / "nginx.conf")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"deploy examples: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
