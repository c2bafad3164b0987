"""``python -m flywheel``: the same CLI as the ``flywheel`` command (job workers use it)."""

from flywheel.cli.main import app

app()
