"""Tools for testing applications and routes against real HTTP servers on loopback."""

from flywheel.testing.upstream import FakeUpstream, create_upstream_app

__all__ = ["FakeUpstream", "create_upstream_app"]
