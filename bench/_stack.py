"""A fake upstream and a Flywheel server, each its own process on loopback, for benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from flywheel.testing.upstream import free_port

BIN = Path(sys.executable).parent
KEY = "fw-bench-key"
CONFIG = """providers:
  up: {{type: openai, base_url: 'http://127.0.0.1:{port}/v1'}}
models:
  - {{name: up-echo, provider: up, upstream_name: echo}}
routes:
  - {{name: echo, targets: [{{model: up-echo}}]}}
"""


@dataclass(frozen=True)
class Stack:
    flywheel_url: str
    upstream_url: str
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def wait_until_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def running_stack(
    config: str = CONFIG, env: dict[str, str] | None = None, ready_timeout: float = 60
) -> Iterator[Stack]:
    """The fake upstream (route ``echo`` answers ``echo: <last user message>``) and
    ``flywheel up`` with tracing into SQLite in a fresh home. ``config`` is a flywheel.yaml
    with ``{port}`` for the upstream's port; ``env`` adds server settings."""
    up_port, fw_port = free_port(), free_port()
    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    (home / "flywheel.yaml").write_text(config.format(port=up_port))
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_CONFIG_FILE": str(home / "flywheel.yaml"),
        "FLYWHEEL_ADMIN_KEY": KEY,
        "FLYWHEEL_LOG_LEVEL": "warning",
        **(env or {}),
    }
    upstream = subprocess.Popen(
        [sys.executable, "-m", "flywheel.testing.upstream", "--port", str(up_port)],
        stdout=subprocess.DEVNULL,
    )
    server = subprocess.Popen(
        [str(BIN / "flywheel"), "up", "--port", str(fw_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{up_port}/calls")
        wait_until_up(f"http://127.0.0.1:{fw_port}/readyz", timeout=ready_timeout)
        yield Stack(f"http://127.0.0.1:{fw_port}", f"http://127.0.0.1:{up_port}", KEY)
    finally:
        for process in (server, upstream):
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        shutil.rmtree(home, ignore_errors=True)
