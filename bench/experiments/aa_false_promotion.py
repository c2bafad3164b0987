"""False promotions of the experiment test over many simulated A/A experiments, and the power
and samples needed when one variant is truly better.

Each experiment splits traffic evenly, looks after every batch (as the experiment runner does
after each evaluation tick) with :func:`flywheel.experiments.stats.sequential_test`, and stops
at the first decision or at the sample limit. For comparison the same looks are also made with
a fixed-sample two-sided z-test at the same alpha ("naive peeking"), which is what a 95/5 split
plus a dashboard amounts to.

    python bench/experiments/aa_false_promotion.py            # 2,000 A/A runs per metric
    python bench/experiments/aa_false_promotion.py --quick    # 300
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _machine import describe

from flywheel.experiments.stats import ArmStats, sequential_test

Sampler = Callable[[np.random.Generator, int, float], np.ndarray]


def thumbs(rng: np.random.Generator, size: int, rate: float) -> np.ndarray:
    """Feedback as 1 (thumbs up) or 0."""
    return (rng.random(size) < rate).astype(float)


def judge(rng: np.random.Generator, size: int, mean: float) -> np.ndarray:
    """Judge scores in [0, 1]: a beta distribution with the given mean (concentration 4)."""
    return rng.beta(4 * mean, 4 * (1 - mean), size)


def _z_significant(control: ArmStats, candidate: ArmStats, alpha: float) -> bool:
    if control.variance is None or candidate.variance is None:
        return False
    v = control.variance / control.n + candidate.variance / candidate.n
    if v <= 0:
        return False
    z = abs((candidate.mean or 0) - (control.mean or 0)) / math.sqrt(v)
    return math.erfc(z / math.sqrt(2)) <= alpha


def simulate(
    sampler: Sampler,
    control_value: float,
    candidate_value: float,
    runs: int,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    wins = losses = naive = 0
    samples: list[int] = []
    for _ in range(runs):
        control, candidate, p = ArmStats(), ArmStats(), 1.0
        naive_hit = False
        while control.n < args.limit:
            control = control.merge(ArmStats.of(sampler(rng, args.batch, control_value)))
            candidate = candidate.merge(ArmStats.of(sampler(rng, args.batch, candidate_value)))
            look = sequential_test(
                control,
                candidate,
                alpha=args.alpha,
                tau=args.tau,
                min_samples=args.min_samples,
                previous_p=p,
            )
            p = look.p_value
            if control.n >= args.min_samples and not naive_hit:
                naive_hit = _z_significant(control, candidate, args.alpha)
            if look.decision != "continue":
                wins += look.decision == "win"
                losses += look.decision == "loss"
                samples.append(control.n + candidate.n)
                break
        naive += naive_hit
    return {
        "runs": runs,
        "promoted": wins / runs,
        "rolled_back": losses / runs,
        "naive_peeking_decided": naive / runs,
        "median_samples_to_decide": float(np.median(samples)) if samples else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--min-samples", type=int, default=100)
    parser.add_argument("--batch", type=int, default=50, help="samples per arm between looks")
    parser.add_argument("--limit", type=int, default=5000, help="samples per arm at most")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = 300 if args.quick else args.runs
    scenarios = [
        ("thumbs A/A 0.60 vs 0.60", thumbs, 0.60, 0.60, runs),
        ("judge A/A 0.70 vs 0.70", judge, 0.70, 0.70, runs),
        ("thumbs 0.60 vs 0.65 (better)", thumbs, 0.60, 0.65, max(runs // 5, 50)),
        ("thumbs 0.60 vs 0.55 (worse)", thumbs, 0.60, 0.55, max(runs // 5, 50)),
        ("judge 0.70 vs 0.75 (better)", judge, 0.70, 0.75, max(runs // 5, 50)),
    ]
    started = time.perf_counter()
    rows = {}
    for index, (label, sampler, control, candidate, count) in enumerate(scenarios):
        rows[label] = simulate(sampler, control, candidate, count, args, seed=index)
    print(
        f"\nSequential test (mSPRT, alpha {args.alpha}, tau {args.tau}, min {args.min_samples}"
        f"/arm, a look every {args.batch}/arm, at most {args.limit}/arm)\n"
    )
    print("| scenario | runs | promoted | rolled back | naive peeking decided | median n |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['runs']} | {r['promoted']:.3f} | {r['rolled_back']:.3f} "
            f"| {r['naive_peeking_decided']:.3f} | {r['median_samples_to_decide']:.0f} |"
        )
    print(f"\n{time.perf_counter() - started:.1f} s; machine: {json.dumps(describe())}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "rows": rows}))


if __name__ == "__main__":
    main()
