"""The lineage graph of a model version: where it came from and where it went.

Dataset versions → the run (and job) that trained on them → the version, up its parent chain
(base → adapter → merged → quantized), → the eval runs of each version's served name → the
routes of the current config that target it. Nodes carry a UI ``url`` and, where one exists,
a ``ref`` (``name@version``); edges point the way the data flowed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from flywheel.registry.serving import served_name
from flywheel.store import (
    Database,
    Dataset,
    DatasetVersion,
    EvalRun,
    Job,
    ModelVersion,
    RegisteredModel,
    Run,
)

# The UI pages of each node type (routes are shown on their monitor page).
URLS = {
    "dataset": "/datasets/{name}?{query}",
    "run": "/runs/{id}",
    "job": "/jobs/{id}",
    "model_version": "/registry/{name}/versions/{version}",
    "eval_run": "/evals/runs/{id}",
    "route": "/monitor/{name}",
}
# Eval runs per version shown in the graph (the newest ones).
MAX_EVAL_RUNS = 50
# Longest parent chain followed; real chains are a handful of steps long.
MAX_CHAIN = 64
_DATASET_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})@(?P<version>[0-9]{1,9})$")
_ROW_ID = re.compile(r"^[0-9a-f]{32}$")


class _Graph:
    """Nodes by id and edges without duplicates, in the order they were found."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.edges: dict[tuple[str, str, str], dict[str, Any]] = {}

    def node(self, node_id: str, node_type: str, label: str, **fields: Any) -> str:
        if node_id not in self.nodes:
            self.nodes[node_id] = {"id": node_id, "type": node_type, "label": label, **fields}
        return node_id

    def edge(self, source: str, target: str, relation: str, **fields: Any) -> None:
        key = (source, target, relation)
        self.edges.setdefault(
            key, {"source": source, "target": target, "relation": relation, **fields}
        )

    def to_dict(self, focus: str) -> dict[str, Any]:
        return {
            "focus": focus,
            "nodes": list(self.nodes.values()),
            "edges": list(self.edges.values()),
        }


def _version_query(version: int) -> str:
    return urlencode({"version": version})


class _Builder:
    def __init__(self, session: Session, project_id: str, routes: Sequence[Mapping[str, Any]]):
        self.session = session
        self.project_id = project_id
        self.routes = routes
        self.graph = _Graph()
        self._models: dict[str, RegisteredModel | None] = {}

    def model(self, model_id: str) -> RegisteredModel | None:
        if model_id not in self._models:
            found = self.session.get(RegisteredModel, model_id)
            # A row of another project is never shown, even if an id pointed at it.
            self._models[model_id] = (
                found if found is not None and found.project_id == self.project_id else None
            )
        return self._models[model_id]

    def version_node(self, row: ModelVersion, *, focus: bool = False) -> str | None:
        model = self.model(row.model_id)
        if model is None:
            return None
        ref = f"{model.name}@{row.version}"
        return self.graph.node(
            f"model_version:{ref}",
            "model_version",
            f"{model.name} v{row.version} ({row.kind})",
            ref=ref,
            kind=row.kind,
            format=row.format,
            served_name=served_name(model.name, row.version, project_id=self.project_id),
            focus=focus,
            url=URLS["model_version"].format(name=quote(model.name), version=row.version),
        )

    def dataset_node(self, ref: str) -> str | None:
        match = _DATASET_REF.match(ref)
        if match is None:
            return None
        name, version = match["name"], int(match["version"])
        row = self.session.scalar(
            select(DatasetVersion)
            .join(Dataset, Dataset.id == DatasetVersion.dataset_id)
            .where(
                Dataset.project_id == self.project_id,
                Dataset.name == name,
                DatasetVersion.version == version,
            )
        )
        fields: dict[str, Any] = {"ref": ref, "missing": row is None}
        if row is not None:
            fields.update(items=row.item_count, content_hash=row.content_hash)
        return self.graph.node(
            f"dataset:{ref}",
            "dataset",
            f"{name} v{version}",
            url=URLS["dataset"].format(name=quote(name), query=_version_query(version)),
            **fields,
        )

    def run_node(self, run_id: str) -> tuple[str | None, Run | None]:
        run = self.session.get(Run, run_id)
        if run is None or run.project_id != self.project_id:
            return None, None
        node = self.graph.node(
            f"run:{run.id}",
            "run",
            run.name or run.id,
            run_id=run.id,
            kind=run.kind,
            status=run.status,
            experiment=run.experiment,
            url=URLS["run"].format(id=quote(run.id)),
        )
        return node, run

    def job_node(self, job_id: str) -> str | None:
        job = self.session.get(Job, job_id)
        if job is None or job.project_id != self.project_id:
            return None
        return self.graph.node(
            f"job:{job.id}",
            "job",
            job.name or f"{job.kind} job",
            job_id=job.id,
            kind=job.kind,
            status=job.status,
            url=URLS["job"].format(id=quote(job.id)),
        )

    def origin(self, row: ModelVersion, node: str) -> None:
        """Datasets → run/job → the version."""
        run_node, run = self.run_node(row.run_id) if row.run_id else (None, None)
        job_id = row.job_id or (run.job_id if run is not None else None)
        job_node = self.job_node(job_id) if job_id else None
        producer = run_node or job_node or node
        if run_node is not None:
            self.graph.edge(run_node, node, "produced")
            if job_node is not None:
                self.graph.edge(job_node, run_node, "executed")
        elif job_node is not None:
            self.graph.edge(job_node, node, "produced")
        inputs = list(row.datasets or [])
        if run is not None:
            inputs += [i for i in run.inputs or [] if isinstance(i, str)]
        for ref in dict.fromkeys(inputs):
            if _ROW_ID.match(ref):
                # A model version the run read (its base, usually).
                read = self.session.get(ModelVersion, ref)
                source = self.version_node(read) if read is not None else None
                if source is not None and source != node:
                    self.graph.edge(source, producer, "input")
                continue
            dataset = self.dataset_node(ref)
            if dataset is not None:
                self.graph.edge(dataset, producer, "trained_on" if producer == node else "input")

    def evaluations(self, node: str, served: str, ref: str) -> None:
        targets = (served, f"model:{served}", f"model:{ref}")
        rows = self.session.scalars(
            select(EvalRun)
            .where(
                EvalRun.project_id == self.project_id,
                or_(EvalRun.target.in_(targets), EvalRun.resolved_target.in_(targets)),
            )
            .order_by(EvalRun.created_at.desc())
            .limit(MAX_EVAL_RUNS)
        )
        for run in rows:
            summary = run.summary or {}
            scores = {
                scorer: values.get("mean")
                for scorer, values in (summary.get("scorers") or {}).items()
                if isinstance(values, dict)
            }
            eval_node = self.graph.node(
                f"eval_run:{run.id}",
                "eval_run",
                f"eval {run.suite or run.dataset} ({run.status})",
                eval_run_id=run.id,
                suite=run.suite,
                dataset=f"{run.dataset}@{run.dataset_version}",
                target=run.target,
                status=run.status,
                passed=summary.get("passed"),
                scores=scores,
                created_at=run.created_at,
                url=URLS["eval_run"].format(id=quote(run.id)),
            )
            self.graph.edge(node, eval_node, "evaluated_by")
            dataset = self.dataset_node(f"{run.dataset}@{run.dataset_version}")
            if dataset is not None:
                self.graph.edge(dataset, eval_node, "evaluated_on")

    def serving(self, node: str, served: str) -> None:
        for route in self.routes:
            name = str(route.get("name", ""))
            targets = [t for t in route.get("targets") or [] if isinstance(t, Mapping)]
            weights = [t.get("weight", 1.0) for t in targets if t.get("model") == served]
            relation = "target" if weights else None
            if relation is None and served in (route.get("fallbacks") or []):
                relation = "fallback"
            if relation is None:
                continue
            route_node = self.graph.node(
                f"route:{name}",
                "route",
                name,
                production=bool(route.get("production", False)),
                url=URLS["route"].format(name=quote(name)),
            )
            if weights:
                self.graph.edge(node, route_node, relation, weight=weights[0])
            else:
                self.graph.edge(node, route_node, relation)


def lineage(
    db: Database,
    project_id: str,
    version_row: ModelVersion,
    routes: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The lineage graph of ``version_row`` (a version of ``project_id``): ``{"focus",
    "nodes": [{"id", "type", "label", "url", …}], "edges": [{"source", "target",
    "relation"}]}``. ``routes`` are the current config's routes as plain dicts.

    Node types: dataset, run, job, model_version, eval_run, route. Relations: trained_on /
    input (a dataset or model into a run), executed (job → run), produced (run or job →
    version), parent (a version → the version made from it), evaluated_by, evaluated_on
    (the eval's dataset), target (with its ``weight``) and fallback (version → route).
    """
    with db.session() as session:
        builder = _Builder(session, project_id, routes)
        focus = builder.version_node(version_row, focus=True)
        if focus is None:
            raise ValueError(f"model version {version_row.id} is not in project {project_id}")
        row: ModelVersion | None = version_row
        node: str | None = focus
        seen: set[str] = set()
        while row is not None and node is not None and row.id not in seen:
            seen.add(row.id)
            model = builder.model(row.model_id)
            assert model is not None  # version_node found it
            builder.origin(row, node)
            served = served_name(model.name, row.version, project_id=project_id)
            builder.evaluations(node, served, f"{model.name}@{row.version}")
            builder.serving(node, served)
            if row.parent_id is None or len(seen) >= MAX_CHAIN:
                break
            parent = session.get(ModelVersion, row.parent_id)
            parent_node = builder.version_node(parent) if parent is not None else None
            if parent_node is not None:
                builder.graph.edge(parent_node, node, "parent")
            row, node = parent, parent_node
        return builder.graph.to_dict(focus)


__all__ = ["URLS", "lineage"]
