"""`flywheel loop` end to end on the embedded default, full length, timed.

A fresh `flywheel up` serves a support route with the local SmolLM2. Simulated users
(flywheel.testing.users) ask travel questions, thumb down every answer that is not in the
house style and correct it. Then one `POST /api/loops` runs the whole cycle: collect the bad
answers, a dataset version with the corrections as targets, LoRA SFT, the merged version in
the registry, the eval gate against production, an approval (a second key approves: four
eyes), a 50 % canary with fresh users rating by the same rule, and the automatic decision.

Reports each step's wall time, the gate's figures, each canary arm's thumbs-up rate, the
decision, and the total from the loop's start to its decision (the target: at most 15 minutes
on the 2-core machine).

    .venv/bin/python bench/loop/loop_e2e.py [--calls 48] [--epochs 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import describe
from _stack import running_stack

from flywheel.testing.users import SimulatedUsers

CONFIG = """providers:
  local: {{type: local}}
  up: {{type: openai, base_url: 'http://127.0.0.1:{port}/v1'}}
models:
  - {{name: smollm2-135m-instruct, provider: local, source: "builtin:smollm2"}}
routes:
  - {{name: support, production: true, targets: [{{model: smollm2-135m-instruct}}]}}
"""
ENDS = {"promoted", "rolled_back", "rejected", "not_enough_data", "gate_failed", "failed"}


def _key(admin: httpx.Client, name: str) -> httpx.Client:
    made = admin.post("/api/keys", json={"name": name, "role": "admin", "scope": "admin"})
    made.raise_for_status()
    return httpx.Client(
        base_url=str(admin.base_url),
        headers={"Authorization": f"Bearer {made.json()['key']}"},
        timeout=300,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "FLYWHEEL_LOOP_INTERVAL": "1",
        "FLYWHEEL_EXPERIMENT_INTERVAL": "2",
        "FLYWHEEL_JOB_CONCURRENCY": "1",
    }
    with running_stack(CONFIG, env=env, ready_timeout=600) as stack:
        admin = httpx.Client(base_url=stack.flywheel_url, headers=stack.auth, timeout=300)
        # The operator is the instance admin (a loop changes the running config); a project
        # admin reviews (four eyes).
        operator, reviewer = admin, _key(admin, "reviewer")
        users = SimulatedUsers(operator, "support")
        began = time.monotonic()
        before = users.visit(args.calls)
        traffic_s = time.monotonic() - began
        print(f"{args.calls} calls rated and corrected in {traffic_s:.0f} s: {before}", flush=True)

        spec = {
            "route": "support",
            "min_examples": 16,
            "train": {
                "learning_rate": 2e-3,
                "epochs": args.epochs,
                "batch_size": 8,
                "max_length": 64,
                "lora": {"rank": 8, "alpha": 16},
            },
            "gate": {"max_tokens": 24},
            "canary": {"share": 0.5, "min_samples": args.min_samples},
        }
        started = operator.post("/api/loops", json=spec)
        started.raise_for_status()
        loop_id = started.json()["id"]
        loop_began = time.monotonic()
        approved_after = None
        first_user = 10_000
        shown = None
        while True:
            loop = operator.get(f"/api/loops/{loop_id}").json()
            state = (loop["status"], loop["step"])
            if state != shown:
                print(f"{time.monotonic() - loop_began:6.0f} s  {state}", flush=True)
                shown = state
            if loop["status"] in ENDS:
                break
            if time.monotonic() - loop_began > args.timeout:
                raise SystemExit(f"loop still {state} after {args.timeout} s")
            if state == ("waiting", "approval") and approved_after is None:
                step = next(s for s in loop["steps"] if s["name"] == "approval")
                reviewer.post(
                    f"/api/approvals/{step['result']['approval_id']}/approve", json={}
                ).raise_for_status()
                approved_after = time.monotonic() - loop_began
            elif state == ("waiting", "approval"):
                time.sleep(0.5)  # approved: the driver moves on at its next tick
            elif state == ("waiting", "decision"):
                users.visit(10, first_user=first_user, first_question=100, correct=False)
                first_user += 10
            else:
                time.sleep(1)
        total_s = time.monotonic() - loop_began
        steps = {s["name"]: s for s in loop["steps"]}
        experiment_id = (steps["canary"].get("result") or {}).get("experiment_id")
        arms = {}
        if experiment_id:
            experiment = operator.get(f"/api/experiments/{experiment_id}").json()
            last = (experiment.get("looks") or [{}])[-1]
            arms = {
                name: {
                    "n": arm["primary"]["n"],
                    "thumbs_up": arm["primary"]["total"] / max(arm["primary"]["n"], 1),
                }
                for name, arm in (last.get("arms") or {}).items()
            }
        return {
            "status": loop["status"],
            "reason": loop["reason"],
            "loop_seconds": round(total_s, 1),
            "traffic_before_seconds": round(traffic_s, 1),
            "approved_after_seconds": approved_after and round(approved_after, 1),
            "steps": {
                name: {
                    "status": step["status"],
                    "seconds": round((step["finished_at"] or 0) - (step["started_at"] or 0), 1)
                    if step["started_at"]
                    else None,
                }
                for name, step in steps.items()
            },
            "gate": {
                k: (steps["gate"].get("result") or {}).get(k)
                for k in ("summary", "production_mean", "candidate_mean", "p_value")
            },
            "canary_arms": arms,
            "calls": args.calls,
            "epochs": args.epochs,
            "min_samples": args.min_samples,
            "machine": describe(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=48, help="Calls users rate before.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--min-samples", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    minutes = result["loop_seconds"] / 60
    print(f"\nloop: {result['status']} in {minutes:.1f} min (target: at most 15)")


if __name__ == "__main__":
    main()
