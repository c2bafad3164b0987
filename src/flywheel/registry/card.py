"""A model card for a registered model version, in the Hugging Face layout.

YAML front matter (license, base_model, tags, datasets) and then the sections a reader looks
for: details, intended use, limitations, training data, training procedure, evaluation,
lineage and how to serve. Only recorded facts are written: what nobody stated (a license,
an intended use) says "not stated", never a guess.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import yaml

NOT_STATED = "not stated"
# HF's base_model_relation for each kind made from a parent (a merged LoRA is a fine-tune).
_RELATIONS = {"adapter": "adapter", "merged": "finetune", "quantized": "quantized"}


def _cell(value: Any) -> str:
    """A value as one markdown table cell."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _size(size_bytes: int) -> str:
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _metric_rows(metrics: Mapping[str, Any]) -> tuple[list[list[Any]], list[list[Any]]]:
    """Before/after pairs (``{"loss": {"before": a, "after": b}}`` or ``loss_before`` /
    ``loss_after``) as rows with their change, and every other metric as a plain row."""
    paired: dict[str, dict[str, Any]] = {}
    plain: list[list[Any]] = []
    for key, value in metrics.items():
        if isinstance(value, Mapping) and ({"before", "after"} & set(value)):
            paired.setdefault(key, {}).update(before=value.get("before"), after=value.get("after"))
        elif key.endswith(("_before", "_after")):
            base, _, when = key.rpartition("_")
            paired.setdefault(base, {})[when] = value
        else:
            plain.append([key, value])
    rows = []
    for key, pair in paired.items():
        before, after = pair.get("before"), pair.get("after")
        first, last = _number(before), _number(after)
        change = f"{last - first:+.6g}" if first is not None and last is not None else ""
        rows.append([key, "" if before is None else before, "" if after is None else after, change])
    return rows, plain


def _front_matter(
    model: Mapping[str, Any], version: Mapping[str, Any], datasets: Sequence[Mapping[str, Any]]
) -> str:
    meta: dict[str, Any] = {}
    if model.get("license"):
        meta["license"] = model["license"]
    if version.get("parent"):
        meta["base_model"] = version["parent"]
        relation = _RELATIONS.get(str(version.get("kind")))
        if relation:
            meta["base_model_relation"] = relation
    if version.get("format") == "peft":
        meta["library_name"] = "peft"
    meta["tags"] = ["flywheel", str(version.get("kind")), str(version.get("format"))]
    if datasets:
        meta["datasets"] = [f"{d['dataset']}@{d['version']}" for d in datasets]
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)


def _lineage_lines(lineage: Mapping[str, Any] | None) -> list[str]:
    if lineage is None:
        return ["Not computed."]
    labels = {n["id"]: n.get("label", n["id"]) for n in lineage.get("nodes", [])}
    edges = lineage.get("edges", [])
    if not edges:
        return ["No recorded origin: no datasets, runs, parents, evaluations or routes."]
    return [
        f"- {labels.get(e['source'], e['source'])} → {labels.get(e['target'], e['target'])} "
        f"({e['relation']})"
        for e in edges
    ]


def _eval_rows(lineage: Mapping[str, Any] | None, focus: str | None) -> list[list[Any]]:
    if lineage is None:
        return []
    evaluated = {
        e["target"]
        for e in lineage.get("edges", [])
        if e.get("relation") == "evaluated_by" and e.get("source") == focus
    }
    rows = []
    for node in lineage.get("nodes", []):
        if node.get("id") not in evaluated:
            continue
        scores = ", ".join(
            f"{name} {value:.4g}" if isinstance(value, int | float) else f"{name} n/a"
            for name, value in (node.get("scores") or {}).items()
        )
        passed = node.get("passed")
        verdict = "" if passed is None else ("passed" if passed else "failed")
        rows.append(
            [node.get("suite") or "-", node.get("dataset"), node.get("status"), verdict, scores]
        )
    return rows


def model_card(
    model: Mapping[str, Any],
    version: Mapping[str, Any],
    lineage: Mapping[str, Any] | None,
    datasets: Sequence[Mapping[str, Any]],
) -> str:
    """The markdown model card of ``version`` of ``model``.

    ``model`` and ``version`` are the registry's dicts, ``lineage`` the version's graph (its
    eval runs fill the evaluation section; None leaves the lineage out) and ``datasets`` the
    dataset versions it was trained on (``{"dataset", "version", "items", "content_hash",
    "source"}``, as the dataset store describes a version).
    """
    ref = version["ref"]
    created = datetime.fromtimestamp(float(version["created_at"]), UTC).strftime("%Y-%m-%d")
    lines = ["---", _front_matter(model, version, datasets).rstrip(), "---", ""]
    lines += [f"# {model['name']} v{version['version']}", ""]
    description = version.get("description") or model.get("description")
    if description:
        lines += [str(description), ""]

    lines += ["## Model details", ""]
    aliases = ", ".join(version.get("aliases") or []) or "none"
    details = [
        ("Reference", f"`{ref}`"),
        ("Kind", version["kind"]),
        ("Format", version["format"]),
        ("Size", _size(int(version.get("size_bytes") or 0))),
        ("Made from", f"`{version['parent']}`" if version.get("parent") else "nothing recorded"),
        ("Aliases", aliases),
        ("License", model.get("license") or NOT_STATED),
        ("Registered", f"{created} by {version.get('created_by') or NOT_STATED}"),
        ("Served as", f"`{version['served_name']}`"),
    ]
    lines += [f"- **{name}:** {value}" for name, value in details]
    lines += [""]

    lines += ["## Intended use", "", str(model.get("intended_use") or NOT_STATED), ""]
    lines += ["## Limitations", "", str(model.get("limitations") or NOT_STATED), ""]

    lines += ["## Training data", ""]
    if datasets:
        for data in datasets:
            source = data.get("source") or {}
            kind = source.get("kind") if isinstance(source, Mapping) else None
            lines.append(
                f"- `{data['dataset']}@{data['version']}`: {data.get('items', '?')} items, "
                f"content hash `{data.get('content_hash', '?')}`"
                + (f", from {kind}" if kind else "")
            )
    else:
        lines.append(f"{NOT_STATED.capitalize()}: no dataset version is recorded.")
    lines += [""]

    lines += ["## Training procedure", ""]
    params = version.get("params") or {}
    if params:
        lines += _table(["Parameter", "Value"], sorted(params.items()))
    else:
        lines.append(f"{NOT_STATED.capitalize()}: no parameters are recorded.")
    lines += [""]

    lines += ["## Evaluation", ""]
    paired, plain = _metric_rows(version.get("metrics") or {})
    evals = _eval_rows(lineage, lineage.get("focus") if lineage else None)
    if paired:
        lines += [*_table(["Metric", "Before", "After", "Change"], paired), ""]
    if plain:
        lines += [*_table(["Metric", "Value"], plain), ""]
    if evals:
        lines += ["Eval runs of this version:", ""]
        lines += _table(["Suite", "Dataset", "Status", "Verdict", "Mean scores"], evals)
        lines += [""]
    if not (paired or plain or evals):
        lines += ["No metrics or eval runs are recorded.", ""]

    lines += ["## Lineage", "", *_lineage_lines(lineage), ""]

    served = version["served_name"]
    lines += ["## How to serve", ""]
    if version.get("kind") == "adapter" or version.get("format") == "peft":
        lines += [
            f"`{ref}` is an adapter: merge it into its base (a merged version) and serve that.",
            "",
        ]
    else:
        snippet = yaml.safe_dump(
            {
                "models": [
                    {"name": served, "provider": "local", "kind": "chat", "source": "<path>"}
                ],
                "routes": [{"name": "<route>", "targets": [{"model": served}]}],
            },
            sort_keys=False,
        )
        lines += [
            f"Serve `{ref}` from a local provider as the catalog model `{served}`; the "
            "registry's serve command writes this config with the version's local path as "
            "the source:",
            "",
            "```yaml",
            snippet.rstrip(),
            "```",
            "",
        ]
    return "\n".join(lines)


__all__ = ["NOT_STATED", "model_card"]
