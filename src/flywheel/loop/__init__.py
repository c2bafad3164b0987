"""``flywheel loop``: a route's bad answers, through a dataset, tuning, an eval gate, the
registry, an approval and a canary experiment, to a better model in production or to an
automatic rollback. Each step runs as a job; the driver moves loops along."""

from flywheel.loop.spec import STEPS, LoopSpec, parse_loop_spec
from flywheel.loop.store import LoopError, LoopStore, loop_to_dict

__all__ = ["STEPS", "LoopError", "LoopSpec", "LoopStore", "loop_to_dict", "parse_loop_spec"]
