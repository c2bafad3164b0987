"""The UI's model registry pages: registered models, one model's versions with its aliases
and their history, and one version with its model card, its lineage graph and the actions
that make the next version (merge, quantize, prune), move an alias or serve it on a route.

A thin edge over :class:`~flywheel.registry.store.ModelRegistry`, ``Services.submit_job`` and
``Services.serve_model`` (what ``/api/registry`` and ``/api/jobs`` use). The card is rendered
from its markdown with raw HTML disabled; the lineage graph is laid out here, in columns
from the data to the routes, and drawn as SVG by the template.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from markdown_it import MarkdownIt

from flywheel.errors import ServiceError
from flywheel.security import Principal
from flywheel.server.http import services
from flywheel.server.services import Services
from flywheel.tuning.jobs import MergeJobParams, PruneJobParams, QuantizeJobParams
from flywheel.ui.datasets import clip, error_page, form_fields, number
from flywheel.ui.jobs import dataset_choices, job_url, run_url, submit, version_url
from flywheel.ui.present import fmt_json
from flywheel.ui.prompts import PageError
from flywheel.ui.routes import render
from flywheel.ui.session import ui_authorize

router = APIRouter(include_in_schema=False)

QUANTIZE_METHODS: tuple[str, ...] = get_args(QuantizeJobParams.model_fields["method"].annotation)
PRUNE_METHODS: tuple[str, ...] = get_args(PruneJobParams.model_fields["method"].annotation)
MERGE_DTYPES: tuple[str, ...] = get_args(MergeJobParams.model_fields["dtype"].annotation)
STEPS = ("merge", "quantize", "prune")
SERVE_STATUSES = ("experimental", "approved")
# What each kind of version can be turned into from its page.
STEPS_BY_KIND = {
    "adapter": ("merge",),
    "base": ("quantize", "prune"),
    "merged": ("quantize", "prune"),
    "pruned": ("quantize",),
    "quantized": (),
}

# The card's markdown: CommonMark with tables; raw HTML is shown as text, never rendered,
# and links keep to safe schemes (markdown-it refuses javascript:, vbscript:, file:, data:).
_MARKDOWN = MarkdownIt("js-default", {"html": False, "linkify": False, "typographer": False})


def model_url(name: str, **query: str) -> str:
    """The page of registered model ``name``."""
    base = f"/registry/{quote(name, safe='')}"
    return f"{base}?{urlencode(query)}" if query else base


def render_card(markdown: str) -> tuple[str, str]:
    """The card's YAML front matter (as text) and its body as safe HTML."""
    front, body = "", markdown
    if markdown.startswith("---\n"):
        end = markdown.find("\n---\n", 4)
        if end != -1:
            front, body = markdown[4:end], markdown[end + 5 :]
    return front, _MARKDOWN.render(body)


# -- lineage layout ---------------------------------------------------------------------------

NODE_WIDTH = 196
NODE_HEIGHT = 48
COLUMN_GAP = 64
ROW_GAP = 14
PAD = 16
HEADER = 28
LABEL_CHARS = 27
TYPE_NAMES = {
    "dataset": "Datasets",
    "job": "Jobs",
    "run": "Runs",
    "model_version": "Model versions",
    "eval_run": "Evaluations",
    "route": "Routes",
}
TYPE_ORDER = {name: rank for rank, name in enumerate(TYPE_NAMES)}
RELATION_TEXT = {
    "trained_on": "trained on",
    "input": "input of",
    "executed": "executed",
    "produced": "produced",
    "parent": "made into",
    "evaluated_by": "evaluated by",
    "evaluated_on": "evaluation data of",
    "target": "served on",
    "fallback": "fallback on",
}


@dataclass
class PlacedNode:
    """A lineage node in its column, with its box's position in the SVG."""

    id: str
    type: str
    label: str
    short: str
    detail: str
    url: str | None
    focus: bool
    column: int = 0
    row: int = 0
    x: int = 0
    y: int = 0


@dataclass
class PlacedEdge:
    """An arrow from one node's right side to another's left side."""

    source: str
    target: str
    relation: str
    text: str
    path: str = ""


@dataclass
class LineageLayout:
    """The lineage graph laid out left to right; ``columns`` are ``(x, title)`` headers."""

    width: int
    height: int
    nodes: list[PlacedNode] = field(default_factory=list)
    edges: list[PlacedEdge] = field(default_factory=list)
    columns: list[tuple[int, str]] = field(default_factory=list)
    node_width: int = NODE_WIDTH
    node_height: int = NODE_HEIGHT


def node_url(node: Mapping[str, Any]) -> str | None:
    """The page a lineage node links to (model versions go to this registry's pages)."""
    if node.get("type") == "model_version" and isinstance(node.get("ref"), str):
        return version_url(node["ref"])
    url = node.get("url")
    return url if isinstance(url, str) and url.startswith("/") else None


def _detail(node: Mapping[str, Any]) -> str:
    kind = {"model_version": node.get("kind"), "run": node.get("kind"), "job": node.get("kind")}
    parts = [node["type"].replace("_", " ")]
    if kind.get(node["type"]):
        parts.append(str(kind[node["type"]]))
    if node.get("status"):
        parts.append(str(node["status"]))
    if node["type"] == "dataset" and node.get("items") is not None:
        parts.append(f"{node['items']} items")
    if node["type"] == "route" and node.get("production"):
        parts.append("production")
    return " · ".join(parts)


def _columns(
    nodes: Sequence[Mapping[str, Any]], edges: Sequence[Mapping[str, Any]]
) -> dict[str, int]:
    """Each node's column: the data first, then the longest path to each node from them,
    with jobs and unfed model versions pulled right next to what they feed; every eval run
    one column after the last model version, and every route after them."""
    kinds = {n["id"]: n["type"] for n in nodes}
    core = {i for i, t in kinds.items() if t in ("dataset", "job", "run", "model_version")}
    preds: dict[str, list[str]] = {i: [] for i in kinds}
    succs: dict[str, list[str]] = {i: [] for i in kinds}
    for edge in edges:
        if edge["source"] in kinds and edge["target"] in kinds:
            preds[edge["target"]].append(edge["source"])
            succs[edge["source"]].append(edge["target"])
    column: dict[str, int] = {}

    def depth(node: str, trail: frozenset[str]) -> int:
        if node in column:
            return column[node]
        inside = [p for p in preds[node] if p in core and p not in trail]
        # The data have the first column to themselves.
        least = 0 if kinds[node] == "dataset" else 1
        found = max((depth(p, trail | {node}) + 1 for p in inside), default=least)
        column[node] = max(found, least)
        return column[node]

    for node in sorted(core, key=lambda i: TYPE_ORDER[kinds[i]]):
        depth(node, frozenset())
    for node in core:
        fed = [p for p in preds[node] if p in core]
        feeds = [column[s] for s in succs[node] if s in core]
        if kinds[node] != "dataset" and not fed and feeds:
            column[node] = max(1, min(feeds) - 1)
    last = max((column[n] for n in core), default=-1)
    evals = [i for i, t in kinds.items() if t == "eval_run"]
    for node in evals:
        column[node] = last + 1
    for node, kind in kinds.items():
        if kind == "route":
            column[node] = last + (2 if evals else 1)
    # Renumber without empty columns.
    used = sorted(set(column.values()))
    index = {value: position for position, value in enumerate(used)}
    return {node: index[value] for node, value in column.items()}


def _order(
    columns: Mapping[str, int], nodes: Mapping[str, PlacedNode], preds: Mapping[str, list[str]]
) -> list[list[str]]:
    """Nodes top to bottom in each column: by type and label, then each column sorted by the
    mean row of what feeds it (fewer crossing arrows)."""
    count = max(columns.values(), default=-1) + 1
    layers: list[list[str]] = [[] for _ in range(count)]
    for node in sorted(nodes, key=lambda i: (TYPE_ORDER[nodes[i].type], nodes[i].label)):
        layers[columns[node]].append(node)
    rows = {node: row for layer in layers for row, node in enumerate(layer)}

    def centre(node: str) -> float:
        fed = [rows[p] for p in preds[node] if columns[p] < columns[node]]
        return sum(fed) / len(fed) if fed else float(rows[node])

    for _ in range(2):
        for layer in layers[1:]:
            layer.sort(key=lambda n: (centre(n), TYPE_ORDER[nodes[n].type]))
            rows.update({node: row for row, node in enumerate(layer)})
    return layers


def layout_lineage(graph: Mapping[str, Any]) -> LineageLayout:
    """Lay ``lineage()``'s graph out in columns, left to right: dataset versions, the jobs
    and runs that used them, the model versions they made (base → adapter → merged →
    quantized), the eval runs of those versions, and the routes that serve them."""
    raw_nodes = [n for n in graph.get("nodes") or [] if n.get("type") in TYPE_ORDER]
    if not raw_nodes:
        return LineageLayout(width=0, height=0)
    focus = graph.get("focus")
    nodes = {
        n["id"]: PlacedNode(
            id=n["id"],
            type=n["type"],
            label=str(n.get("label") or n["id"]),
            short=clip(str(n.get("label") or n["id"]), LABEL_CHARS),
            detail=clip(_detail(n), LABEL_CHARS + 6),
            url=node_url(n),
            focus=n["id"] == focus or bool(n.get("focus")),
        )
        for n in raw_nodes
    }
    edges = [
        e for e in graph.get("edges") or [] if e.get("source") in nodes and e.get("target") in nodes
    ]
    preds: dict[str, list[str]] = {node: [] for node in nodes}
    for edge in edges:
        preds[edge["target"]].append(edge["source"])
    columns = _columns(raw_nodes, edges)
    layers = _order(columns, nodes, preds)
    tallest = max(len(layer) for layer in layers)
    step = NODE_HEIGHT + ROW_GAP
    for position, layer in enumerate(layers):
        # Shorter columns are centred against the tallest one.
        offset = (tallest - len(layer)) * step // 2
        for row, node_id in enumerate(layer):
            node = nodes[node_id]
            node.column, node.row = position, row
            node.x = PAD + position * (NODE_WIDTH + COLUMN_GAP)
            node.y = PAD + HEADER + offset + row * step
    placed_edges = []
    for edge in edges:
        source, target = nodes[edge["source"]], nodes[edge["target"]]
        x1, y1 = source.x + NODE_WIDTH, source.y + NODE_HEIGHT // 2
        x2, y2 = target.x, target.y + NODE_HEIGHT // 2
        if target.column <= source.column:
            # Same column (or backwards): loop out to the right and come back in.
            x2 = target.x + NODE_WIDTH
            bend = COLUMN_GAP // 2
            path = f"M{x1},{y1} C{x1 + bend},{y1} {x2 + bend},{y2} {x2},{y2}"
        else:
            bend = max(COLUMN_GAP // 2, (x2 - x1) // 2)
            path = f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
        relation = str(edge.get("relation", ""))
        text = RELATION_TEXT.get(relation, relation.replace("_", " "))
        if relation == "target" and edge.get("weight") is not None:
            text += f" (weight {edge['weight']:g})"
        placed_edges.append(PlacedEdge(source.id, target.id, relation, text, path))
    titles = []
    for position, layer in enumerate(layers):
        kinds = sorted({nodes[n].type for n in layer}, key=TYPE_ORDER.__getitem__)
        title = " & ".join(TYPE_NAMES[k] for k in kinds)
        titles.append((PAD + position * (NODE_WIDTH + COLUMN_GAP), title))
    ordered = [nodes[node] for node in itertools.chain.from_iterable(layers)]
    return LineageLayout(
        width=PAD * 2 + len(layers) * NODE_WIDTH + (len(layers) - 1) * COLUMN_GAP,
        height=PAD * 2 + HEADER + tallest * step - ROW_GAP,
        nodes=ordered,
        edges=placed_edges,
        columns=titles,
    )


# -- the model list and one model -------------------------------------------------------------


@router.get("/registry")
def registry_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """The project's registered models with their newest version and aliases."""
    svc = services(request)
    models = [
        {
            **m,
            "url": model_url(m["name"]),
            "latest_url": version_url(f"{m['name']}@{m['latest_version']}")
            if m.get("latest_version")
            else None,
        }
        for m in svc.registry.list_models(user.project_id)
    ]
    return render(request, "registry.html", {"nav": "registry", "models": models})


def _version_row(version: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **version,
        "url": version_url(version["ref"]),
        "parent_url": version_url(version["parent"]) if version.get("parent") else None,
        "run_url": run_url(version["run_id"]) if version.get("run_id") else None,
        "job_url": job_url(version["job_id"]) if version.get("job_id") else None,
    }


def _model_context(svc: Services, user: Principal, name: str, **extra: Any) -> dict[str, Any]:
    model = svc.registry.get_model(user.project_id, name)
    versions = [_version_row(v) for v in model["versions"]]
    return {
        "nav": "registry",
        "model": model,
        "url": model_url(name),
        "versions": versions,
        "aliases": [
            {
                "alias": alias,
                "version": version,
                "url": version_url(f"{name}@{version}"),
                "protected": svc.registry.is_protected(alias),
            }
            for alias, version in sorted(model["aliases"].items())
        ],
        "history": svc.registry.alias_history(user.project_id, name),
        "alias_form": {"alias": "", "version": str(versions[0]["version"]) if versions else ""},
        "protected": sorted(svc.registry.protected_aliases),
        "error": None,
        "notice": None,
        **extra,
    }


def _model_error(request: Request, exc: PageError | ServiceError) -> Response:
    title = "Model not found" if exc.status_code == 404 else "Model registry"
    return error_page(request, exc.status_code, title, exc.message, ("/registry", "All models"))


@router.get("/registry/{name}")
def model_page(request: Request, name: str, user: Principal = Depends(ui_authorize)) -> Response:
    """A registered model: its description, its versions (kind, parent, run, size, aliases),
    its aliases with a form to move one, and every alias move."""
    params = request.query_params
    notice = None
    if params.get("moved"):
        notice = f"Alias '{params['moved'][:64]}' moved."
    elif params.get("removed"):
        notice = f"Alias '{params['removed'][:64]}' removed."
    try:
        context = _model_context(services(request), user, name, notice=notice)
    except ServiceError as exc:
        return _model_error(request, exc)
    return render(request, "registry_model.html", context)


@router.post("/registry/{name}/aliases")
async def set_alias(
    request: Request, name: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Point an alias at a version (a protected alias moves only through an approval)."""
    svc = services(request)
    form = await form_fields(request)
    alias = form.get("alias", "").strip()
    version_text = form.get("version", "").strip()
    try:
        if not alias:
            raise PageError(400, "Alias: name the alias to move, e.g. staging.")
        if not version_text.isdecimal() or len(version_text) > 9:
            raise PageError(400, "Version: pick the version the alias points at.")
        await run_in_threadpool(
            svc.registry.set_alias, user.project_id, name, alias, int(version_text), user.actor
        )
    except (PageError, ServiceError) as exc:
        error, status = exc.message, exc.status_code
        kept = {"alias": alias[:64], "version": version_text[:9]}
        try:
            context = await run_in_threadpool(
                lambda: _model_context(svc, user, name, error=error, alias_form=kept)
            )
        except ServiceError as missing:
            return _model_error(request, missing)
        return render(request, "registry_model.html", context, status_code=status)
    return RedirectResponse(model_url(name, moved=alias), status_code=303)


@router.post("/registry/{name}/aliases/{alias}/delete")
async def remove_alias(
    request: Request, name: str, alias: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Remove an unprotected alias."""
    svc = services(request)
    try:
        await run_in_threadpool(svc.registry.remove_alias, user.project_id, name, alias, user.actor)
    except ServiceError as exc:
        error, status = exc.message, exc.status_code
        try:
            context = await run_in_threadpool(lambda: _model_context(svc, user, name, error=error))
        except ServiceError as missing:
            return _model_error(request, missing)
        return render(request, "registry_model.html", context, status_code=status)
    return RedirectResponse(model_url(name, removed=alias), status_code=303)


# -- one version: card, lineage and actions ---------------------------------------------------


def _routes(svc: Services) -> list[dict[str, Any]]:
    return [route.model_dump(mode="json") for route in svc.config.routes]


def _version_context(
    svc: Services, user: Principal, name: str, selector: str, **extra: Any
) -> dict[str, Any]:
    project = user.project_id
    version = _version_row(svc.registry.resolve(project, f"{name}@{selector}"))
    routes = _routes(svc)
    graph = svc.registry.lineage(project, version["ref"], routes)
    front, card_html = render_card(svc.registry.card(project, version["ref"], routes))
    model = svc.registry.get_model(project, name)
    serving = [
        route["name"]
        for route in routes
        if any(t.get("model") == version["served_name"] for t in route.get("targets") or [])
    ]
    steps = STEPS_BY_KIND.get(version["kind"], ())
    return {
        "nav": "registry",
        "model": model,
        "model_url": model_url(name),
        # Not "version": the layout shows Flywheel's own version under that name.
        "model_version": version,
        "url": version_url(version["ref"]),
        "card_front": front,
        "card_html": card_html,
        "lineage": layout_lineage(graph),
        "lineage_edges": graph.get("edges") or [],
        "params_json": fmt_json(version["params"]) if version["params"] else "",
        "metrics": sorted(version["metrics"].items()),
        "steps": steps,
        "quantize_methods": QUANTIZE_METHODS,
        "prune_methods": PRUNE_METHODS,
        "merge_dtypes": MERGE_DTYPES,
        "datasets": dataset_choices(svc, project) if steps else [],
        "route_names": [r["name"] for r in routes],
        "serving": serving,
        "serve_statuses": SERVE_STATUSES,
        "serve_form": {"route": "", "weight": "", "replace": "", "status": "experimental"},
        "versions": [v["version"] for v in model["versions"]],
        "protected": sorted(svc.registry.protected_aliases),
        "error": None,
        "error_form": None,
        "notice": None,
        **extra,
    }


def _version_error(request: Request, name: str, exc: PageError | ServiceError) -> Response:
    title = "Model version not found" if exc.status_code == 404 else "Model version"
    back = ("/registry", "All models")
    if exc.status_code == 404 and "has no" in exc.message:
        back = (model_url(name), f"Model {name}")
    return error_page(request, exc.status_code, title, exc.message, back)


@router.get("/registry/{name}/versions/{version}")
def version_page(
    request: Request, name: str, version: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """A model version (by number or alias): its facts, the model card rendered from
    markdown, the lineage graph from the data to the routes, and the forms that merge,
    quantize or prune it, move an alias to it, or serve it on a route."""
    params = request.query_params
    notice = None
    if params.get("served"):
        revision = params.get("revision", "")[:12]
        notice = f"Serving as {params['served'][:200]} on route {params.get('route', '')[:128]}" + (
            f" (config revision {revision})." if revision else "."
        )
    try:
        context = _version_context(services(request), user, name, version[:64], notice=notice)
    except ServiceError as exc:
        return _version_error(request, name, exc)
    return render(request, "registry_version.html", context)


async def _version_refusal(
    request: Request,
    user: Principal,
    name: str,
    version: str,
    exc: PageError | ServiceError,
    where: str,
    **extra: Any,
) -> Response:
    svc = services(request)
    error, status = exc.message, exc.status_code
    try:
        context = await run_in_threadpool(
            lambda: _version_context(
                svc, user, name, version[:64], error=error, error_form=where, **extra
            )
        )
    except ServiceError as missing:
        return _version_error(request, name, missing)
    return render(request, "registry_version.html", context, status_code=status)


def step_params(step: str, ref: str, form: Mapping[str, str]) -> dict[str, Any]:
    """The merge, quantize or prune form as the job kind's params."""
    params: dict[str, Any] = {"model": ref}
    register = form.get("register", "").strip()
    if register:
        params["register"] = register
    eval_dataset = form.get("eval_dataset", "").strip()
    if eval_dataset:
        params["eval_dataset"] = eval_dataset
    if step == "merge":
        dtype = form.get("dtype", "float32")
        if dtype not in MERGE_DTYPES:
            raise PageError(400, f"Precision: pick one of {', '.join(MERGE_DTYPES)}.")
        params["dtype"] = dtype
    elif step == "quantize":
        method = form.get("method", "")
        if method not in QUANTIZE_METHODS:
            raise PageError(400, f"Method: pick one of {', '.join(QUANTIZE_METHODS)}.")
        params["method"] = method
    else:
        method = form.get("method", "magnitude")
        if method not in PRUNE_METHODS:
            raise PageError(400, f"Method: pick one of {', '.join(PRUNE_METHODS)}.")
        amount = number(form.get("amount", ""), "Sparsity", 0.01, 0.99)
        params["method"] = method
        if amount is not None:
            params["amount"] = amount
    return params


@router.post("/registry/{name}/versions/{version}/jobs")
async def version_job(
    request: Request, name: str, version: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Queue a merge (an adapter onto its base), quantize or prune job of this version, and
    open it; the job registers its result as a new version made from this one."""
    svc = services(request)
    form = await form_fields(request)
    step = form.get("step", "")
    try:
        if step not in STEPS:
            raise PageError(400, "Pick merge, quantize or prune.")
        found = await run_in_threadpool(svc.registry.resolve, user.project_id, f"{name}@{version}")
        if step not in STEPS_BY_KIND.get(found["kind"], ()):
            raise PageError(400, f"A {found['kind']} version cannot be {step}d from here.")
        params = step_params(step, found["ref"], form)
        job = await run_in_threadpool(submit, svc, user, step, params, f"{step} {found['ref']}")
    except (PageError, ServiceError) as exc:
        return await _version_refusal(request, user, name, version, exc, step or "job")
    return RedirectResponse(f"{job_url(job['id'])}?submitted=1", status_code=303)


@router.post("/registry/{name}/versions/{version}/serve")
async def serve_version(
    request: Request, name: str, version: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Serve the version through the local provider on a route (a new route, or one more
    target of an existing one; ``replace`` makes it the only target), as a new config
    revision. Instance admins only: the catalog and routes serve every project."""
    svc = services(request)
    form = await form_fields(request)
    route = form.get("route", "").strip()
    kept = {
        "route": route[:128],
        "weight": form.get("weight", "")[:32],
        "replace": "yes" if form.get("replace") == "yes" else "",
        "status": form.get("status", "experimental"),
    }
    try:
        if not route:
            raise PageError(400, "Route: name the route to serve this version on.")
        if kept["status"] not in SERVE_STATUSES:
            raise PageError(400, "Status: pick experimental or approved.")
        weight = number(kept["weight"], "Weight", 0, 1e9)
        if weight is not None and weight <= 0:
            raise PageError(400, "Weight must be above 0.")
        ref = f"{name}@{version}"
        served = await run_in_threadpool(
            lambda: svc.serve_model(
                user,
                ref,
                route=route,
                weight=weight,
                replace=bool(kept["replace"]),
                status=kept["status"],
            )
        )
    except (PageError, ServiceError) as exc:
        return await _version_refusal(request, user, name, version, exc, "serve", serve_form=kept)
    query = {"served": served["served_name"], "route": route}
    if served.get("revision") is not None:
        query["revision"] = str(served["revision"])
    target = version_url(served["version"]["ref"])
    return RedirectResponse(f"{target}?{urlencode(query)}", status_code=303)
