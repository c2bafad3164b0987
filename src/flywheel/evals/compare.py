"""Baseline run vs candidate run on the same dataset version, and the gate's verdict.

Per scorer: the delta of means, a paired bootstrap interval, a p-value (paired permutation
test by default) and win/tie/loss counts. Items the candidate did worse on are listed with
both outputs side by side. The gate fails when a candidate threshold fails or a scorer
regressed significantly; :func:`junit_xml` and :func:`markdown` report it for CI.
"""

from __future__ import annotations

import html
from typing import Any
from xml.etree import ElementTree as ET

from flywheel.evals.stats import compare_paired
from flywheel.evals.suites import EvalError

MAX_REGRESSIONS = 200


def compare_runs(
    baseline: dict[str, Any],
    candidate: dict[str, Any],
    baseline_results: list[dict[str, Any]],
    candidate_results: list[dict[str, Any]],
    *,
    alpha: float | None = None,
    test: str = "permutation",
) -> dict[str, Any]:
    """The comparison of two finished runs (``run_to_dict`` and their results)."""
    for run in (baseline, candidate):
        if run["status"] != "completed":
            raise EvalError(409, f"Run {run['id']} is {run['status']}, not completed.", "conflict")
    same_items = (
        baseline["dataset"] == candidate["dataset"]
        and baseline["dataset_version"] == candidate["dataset_version"]
        and baseline["split"] == candidate["split"]
    )
    if not same_items:
        raise EvalError(
            400,
            "Runs compare only on the same dataset version and split: "
            f"{baseline['dataset']}@{baseline['dataset_version']} vs "
            f"{candidate['dataset']}@{candidate['dataset_version']}.",
            "not_comparable",
        )
    alpha = alpha if alpha is not None else float(candidate["spec"].get("alpha", 0.05))
    base_by_position = {r["position"]: r for r in baseline_results}
    pairs = [
        (base_by_position[r["position"]], r)
        for r in candidate_results
        if r["position"] in base_by_position
    ]
    base_scorers = (baseline.get("summary") or {}).get("scorers", {})
    cand_scorers = (candidate.get("summary") or {}).get("scorers", {})
    scorers: dict[str, Any] = {}
    regressions: list[dict[str, Any]] = []
    for name, info in cand_scorers.items():
        if name not in base_scorers:
            continue
        higher = bool(info.get("higher_is_better", True))
        result = compare_paired(
            [b["scores"].get(name) for b, _ in pairs],
            [c["scores"].get(name) for _, c in pairs],
            higher_is_better=higher,
            alpha=alpha,
            test=test,
        )
        scorers[name] = result.to_dict()
        for base, cand in pairs:
            b, c = base["scores"].get(name), cand["scores"].get(name)
            if b is None or c is None:
                continue
            worse = c < b if higher else c > b
            if worse:
                regressions.append(
                    {
                        "position": cand["position"],
                        "scorer": name,
                        "baseline_score": b,
                        "candidate_score": c,
                        "baseline_output": base["output"],
                        "candidate_output": cand["output"],
                        "drop": abs(c - b),
                    }
                )
    regressions.sort(key=lambda r: (-r["drop"], r["position"]))
    comparison = {
        "baseline": _run_ref(baseline),
        "candidate": _run_ref(candidate),
        "items": len(pairs),
        "alpha": alpha,
        "test": test,
        "scorers": scorers,
        "regressions": regressions[:MAX_REGRESSIONS],
        "regression_count": len(regressions),
    }
    comparison["gate"] = verdict(comparison, candidate)
    return comparison


def _run_ref(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": run["id"],
        "target": run["target"],
        "resolved_target": run["resolved_target"],
        "dataset": run["dataset"],
        "dataset_version": run["dataset_version"],
        "summary": run["summary"],
    }


def verdict(comparison: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Whether the candidate may ship: every threshold met, no significant regression."""
    checks: list[dict[str, Any]] = []
    for name, info in ((candidate.get("summary") or {}).get("scorers") or {}).items():
        if info.get("threshold") is not None:
            direction = "≥" if info.get("higher_is_better", True) else "≤"
            mean = info.get("mean")
            checks.append(
                {
                    "name": f"threshold {name}",
                    "passed": bool(info.get("passed")),
                    "message": f"mean {_fmt(mean)} {direction} {info['threshold']:g} is required",
                }
            )
    for name, result in comparison["scorers"].items():
        regressed = bool(result.get("regressed"))
        checks.append(
            {
                "name": f"no regression {name}",
                "passed": not regressed,
                "message": f"delta {_fmt(result.get('delta'))} "
                f"[{_fmt(result.get('ci_low'))}, {_fmt(result.get('ci_high'))}], "
                f"p = {_fmt(result.get('p_value'))}",
            }
        )
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def junit_xml(comparison: dict[str, Any]) -> str:
    """The gate's checks as a JUnit XML test suite (one test case per check)."""
    checks = comparison["gate"]["checks"]
    failures = sum(1 for c in checks if not c["passed"])
    suite = ET.Element(
        "testsuite",
        name="flywheel-eval-gate",
        tests=str(len(checks)),
        failures=str(failures),
        errors="0",
    )
    for check in checks:
        case = ET.SubElement(suite, "testcase", classname="flywheel.eval", name=check["name"])
        if not check["passed"]:
            failure = ET.SubElement(case, "failure", message=check["message"])
            failure.text = check["message"]
        else:
            ET.SubElement(case, "system-out").text = check["message"]
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")


def markdown(comparison: dict[str, Any], limit: int = 10) -> str:
    """A Markdown summary for a CI job page or a pull-request comment."""
    gate = comparison["gate"]
    base, cand = comparison["baseline"], comparison["candidate"]
    lines = [
        f"## Flywheel eval gate: {'✅ passed' if gate['passed'] else '❌ failed'}",
        "",
        f"Baseline `{base['resolved_target']}` vs candidate `{cand['resolved_target']}` on "
        f"`{cand['dataset']}@{cand['dataset_version']}` ({comparison['items']} items, "
        f"{comparison['test']} test, alpha = {comparison['alpha']:g}).",
        "",
        "| scorer | baseline | candidate | delta [95% CI] | p | W/T/L | |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in comparison["scorers"].items():
        mark = "regressed" if r["regressed"] else ("improved" if r["improved"] else "")
        lines.append(
            f"| {name} | {_fmt(r['baseline_mean'])} | {_fmt(r['candidate_mean'])} | "
            f"{_fmt(r['delta'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | "
            f"{_fmt(r['p_value'])} | {r['wins']}/{r['ties']}/{r['losses']} | {mark} |"
        )
    lines += ["", "| check | result |", "|---|---|"]
    for check in gate["checks"]:
        lines.append(
            f"| {check['name']} | {'pass' if check['passed'] else 'FAIL'}: "
            f"{html.escape(check['message'])} |"
        )
    if comparison["regressions"]:
        lines += ["", f"### Worst regressions ({comparison['regression_count']} in all)", ""]
        lines += ["| item | scorer | baseline | candidate |", "|---|---|---|---|"]
        for r in comparison["regressions"][:limit]:
            lines.append(
                f"| {r['position']} | {r['scorer']} {_fmt(r['baseline_score'])} → "
                f"{_fmt(r['candidate_score'])} | {_cell(r['baseline_output'])} | "
                f"{_cell(r['candidate_output'])} |"
            )
    return "\n".join(lines) + "\n"


def _cell(text: str | None, limit: int = 120) -> str:
    clean = (text or "").replace("\n", " ").replace("|", "\\|")
    return html.escape(clean[:limit] + ("…" if len(clean) > limit else ""))
