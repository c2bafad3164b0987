"""Vendoring of the UI's front-end libraries from ``node_modules`` into ``static/vendor``.

Run as ``python -m flywheel.ui.assets [--node-modules PATH]`` after ``npm ci``. The server
serves the copied files itself; when they are missing the pages still render, without
charts and with plain links and forms instead of partial swaps.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("flywheel.ui")

STATIC_DIR = Path(__file__).resolve().parent / "static"
VENDOR_DIR = STATIC_DIR / "vendor"


@dataclass(frozen=True)
class VendorFile:
    """One file taken from an npm package's distribution."""

    package: str
    source: str
    name: str

    @property
    def target(self) -> Path:
        """Where the file is served from."""
        return VENDOR_DIR / self.name


VENDOR_FILES: tuple[VendorFile, ...] = (
    VendorFile("htmx.org", "dist/htmx.min.js", "htmx.min.js"),
    VendorFile("chart.js", "dist/chart.umd.min.js", "chart.umd.min.js"),
)

_warned = False


def missing_vendor_files() -> list[VendorFile]:
    """Vendor files not present in ``static/vendor``; warns once per process if any."""
    global _warned
    missing = [f for f in VENDOR_FILES if not f.target.is_file()]
    if missing and not _warned:
        _warned = True
        log.warning(
            "UI assets missing (%s): pages render without charts or partial updates. "
            "Build them with 'npm ci && python -m flywheel.ui.assets' (or 'make assets').",
            ", ".join(f.name for f in missing),
        )
    return missing


def copy_assets(node_modules: Path, target_dir: Path = VENDOR_DIR) -> list[Path]:
    """Copy every vendor file (and its package's licence) from ``node_modules``.

    Raises ``FileNotFoundError`` naming the first missing source so a broken install fails
    the build rather than the page.
    """
    target_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for item in VENDOR_FILES:
        package_dir = node_modules / item.package
        source = package_dir / item.source
        if not source.is_file():
            raise FileNotFoundError(
                f"{source} not found; run 'npm ci --no-audit --no-fund' in the repository root"
            )
        destination = target_dir / item.name
        shutil.copyfile(source, destination)
        written.append(destination)
        # Both libraries are permissively licensed; their licences travel with the copies.
        for licence in sorted(package_dir.glob("LICENSE*")):
            licence_copy = target_dir / f"{item.package}.{licence.name}"
            shutil.copyfile(licence, licence_copy)
            written.append(licence_copy)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m flywheel.ui.assets",
        description="Copy the UI's JavaScript libraries from node_modules into static/vendor.",
    )
    parser.add_argument(
        "--node-modules",
        type=Path,
        default=Path("node_modules"),
        help="node_modules folder to copy from (default: ./node_modules).",
    )
    args = parser.parse_args(argv)
    try:
        written = copy_assets(args.node_modules.expanduser().resolve())
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
