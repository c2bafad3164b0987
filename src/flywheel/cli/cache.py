"""``flywheel cache``: a route's response cache (through the server's API, with the SDK)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from flywheel.cli.common import (
    DEFAULT_URL,
    KeyOption,
    ProjectOption,
    UrlOption,
    _client,
    _fmt,
    _sdk_call,
    console,
)

cache_app = typer.Typer(help="Routes' response caches: hit rates and purging.")


@cache_app.command("stats")
def cache_stats(
    route: Annotated[str, typer.Argument(help="Route name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """The route's cache settings, hits, misses, hit rate and stored answers (this project)."""
    with _client(url, api_key, project) as client:
        stats = _sdk_call(client.route_cache, route)
    if as_json:
        console.print_json(json.dumps(stats))
        return
    if not stats["enabled"]:
        console.print(f"route '{route}' has no cache (add a cache: block to enable one)")
    config = stats["config"] or {}
    rate = stats["hit_rate"]
    console.print(
        f"{route}: {config.get('mode', 'off')} cache, hit rate "
        f"{'-' if rate is None else f'{rate:.1%}'} ({stats['hits']} hits, "
        f"{stats['misses']} misses, {stats['bypassed']} bypassed), "
        f"{stats['entries']} stored, ttl {_fmt(config.get('ttl'))} s"
    )


@cache_app.command("clear")
def cache_clear(
    route: Annotated[str, typer.Argument(help="Route name.")],
    all_projects: Annotated[
        bool, typer.Option("--all-projects", help="Every project's answers (instance admins).")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Drop the route's cached answers (in this project, or every project)."""
    with _client(url, api_key, project) as client:
        result = _sdk_call(client.clear_route_cache, route, all_projects=all_projects)
    where = "every project" if all_projects else f"project '{result['project']}'"
    console.print(f"removed {result['removed']} cached answers of route '{route}' in {where}")
