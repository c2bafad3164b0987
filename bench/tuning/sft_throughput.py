"""SFT step throughput: Flywheel's ``train_sft`` against a plain TRL script, same config.

Both train a LoRA adapter (r=8, alpha 16, q/k/v/o) on the default chat model with the same
records, batch size, max_length and learning rate; the ratio is Flywheel's steps/s over the
plain script's (target >= 1.0). Each variant runs in a fresh process, so none inherits another's
warm caches, and the training loop is timed the same way for all (``StepTimer``: train begin to
end, non-padding tokens as counted by the trainer). Variants:

- ``plain TRL``: ``bench/tuning/plain_trl_sft.py`` (TRL's defaults: bf16 autocast, gradient
  checkpointing, random batches);
- ``plain TRL (fp32)``: the same script with ``bf16=False``, the precision ``train_sft`` picks on
  a CPU without native bf16 (AVX-512 BF16 / AMX), so the ratio against it isolates the wrapper
  from the dtype choice;
- ``train_sft (TRL speed defaults)``: ``train_sft`` with gradient checkpointing on and length
  grouping off, i.e. what the wrapper itself costs;
- ``train_sft``: ``train_sft`` with its defaults (no gradient checkpointing, which a 135M model
  on CPU does not need, and length-grouped batches, which waste less compute on padding).

The ``train_sft`` run also measures the held-out loss before and after (on extra records of the
same synthetic set) and the whole call's time, loading and evaluation included.

    python bench/tuning/sft_throughput.py            # 200 examples, max_length 256, 1 epoch
    python bench/tuning/sft_throughput.py --quick    # 6 steps on the same config
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MODEL_CACHE = Path(os.environ.get("FLYWHEEL_MODEL_CACHE", REPO / ".cache" / "models"))

NAMES = ["Ada", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon"]
ITEMS = ["kettle", "lamp", "backpack", "blender", "monitor", "jacket", "router", "chair"]
PROBLEMS = ["two weeks late", "with a cracked lid", "in the wrong colour", "without a manual"]
WORDS = ["orbit", "lantern", "velvet", "cascade", "harbor", "meadow", "pixel", "summit"]


def _example(rng: random.Random) -> dict[str, Any]:
    """One instruction and its answer: five templated tasks of different lengths, so the
    held-out loss can fall within an epoch and batches need padding."""
    kind = rng.randrange(5)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == 0:
        km = rng.randint(2, 400)
        prompt = f"Convert {km} kilometres to metres."
        answer = f"{km} kilometres is {km * 1000} metres."
    elif kind == 1:
        word = rng.choice(WORDS)
        prompt = f"Spell the word '{word}' backwards."
        answer = f"'{word}' spelled backwards is '{word[::-1]}'."
    elif kind == 2:
        count, price = rng.randint(2, 9), rng.randint(5, 90)
        prompt = f"{name} bought {count} {item}s at ${price} each. Summarise the order."
        answer = (
            f"Order summary: {name} bought {count} {item}s at ${price} each, "
            f"for a total of ${count * price}."
        )
    elif kind == 3:
        problem = rng.choice(PROBLEMS)
        prompt = (
            f"Write a short, polite reply to {name}, whose {item} arrived {problem}. "
            "Offer a replacement or a refund."
        )
        answer = (
            f"Dear {name},\n\nThank you for letting us know that your {item} arrived {problem}. "
            "We are sorry for the trouble. We can send you a replacement right away, or refund "
            "the full price if you prefer: just reply to this message with your choice and we "
            f"will take care of it within one working day.\n\nKind regards,\nThe support team"
        )
    else:
        base, count = rng.randint(2, 12), rng.randint(3, 8)
        prompt = f"List the first {count} multiples of {base}."
        multiples = ", ".join(str(base * i) for i in range(1, count + 1))
        answer = f"The first {count} multiples of {base} are {multiples}."
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": answer}],
    }


def synthetic(count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [_example(rng) for _ in range(count)]


def _as_messages(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"messages": r["prompt"] + r["completion"]} for r in records]


def _load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def run_flywheel(args: argparse.Namespace) -> dict[str, Any]:
    """One ``train_sft`` run in this process (the child side of a variant)."""
    from plain_trl_sft import StepTimer

    from flywheel.providers.local_model import materialize_model
    from flywheel.tuning.config import TrainSettings
    from flywheel.tuning.report import RecordingReporter
    from flywheel.tuning.train import train_sft

    records = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    held_out = [json.loads(line) for line in args.eval_data.read_text().splitlines() if line]
    settings = TrainSettings(
        learning_rate=args.learning_rate,
        epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps > 0 else None,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lora={"rank": args.rank, "alpha": args.alpha},
        gradient_checkpointing=args.variant == "flywheel-trl-defaults",
        group_by_length=args.variant == "flywheel",
    )
    base = materialize_model("builtin:smollm2", MODEL_CACHE)
    timer = StepTimer()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output:
        result = train_sft(
            base,
            _as_messages(records),
            _as_messages(held_out) if args.variant == "flywheel" else [],
            settings,
            Path(output) / "adapter",
            RecordingReporter(),
            callbacks=[timer],
        )
    figures: dict[str, Any] = timer.figures()
    figures.update(
        train_loss=round(result.train_loss or 0.0, 4),
        total_seconds=round(time.perf_counter() - started, 2),
        eval_loss_before=result.eval_loss_before,
        eval_loss_after=result.eval_loss_after,
        peak_memory_mib=round(result.peak_memory_bytes / 2**20),
        precision=result.settings["precision"],
        gradient_checkpointing=settings.gradient_checkpointing,
    )
    return figures


def _child(variant: str, args: argparse.Namespace, data: Path, eval_data: Path) -> dict[str, Any]:
    common = [
        "--data", str(data),
        "--max-steps", str(args.max_steps),
        "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size),
        "--max-length", str(args.max_length),
        "--learning-rate", str(args.learning_rate),
        "--rank", str(args.rank),
        "--alpha", str(args.alpha),
    ]  # fmt: skip
    if variant.startswith("plain"):
        from flywheel.providers.local_model import materialize_model

        base = materialize_model("builtin:smollm2", MODEL_CACHE)
        command = [sys.executable, str(HERE / "plain_trl_sft.py"), "--base", str(base), *common]
        if variant == "plain-fp32":
            command.append("--fp32")
    else:
        command = [sys.executable, __file__, "--variant", variant, "--eval-data", str(eval_data)]
        command += common
    load = _load_average()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"variant {variant} failed ({done.returncode})")
    figures: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    figures["load_average_before"] = load
    return figures


LABELS = {
    "plain": "plain TRL script",
    "plain-fp32": "plain TRL script (fp32)",
    "flywheel-trl-defaults": "train_sft (TRL speed defaults)",
    "flywheel": "train_sft (defaults)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 steps instead of an epoch")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--eval-examples", type=int, default=40)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument(
        "--variants",
        default="plain-fp32,flywheel-trl-defaults,flywheel,plain",
        help="comma-separated; plain (bf16 autocast) is slow on CPUs without native bf16",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    # internal: run one train_sft variant in this process
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--eval-data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:
        print("RESULT " + json.dumps(run_flywheel(args)), flush=True)
        return
    if args.quick and args.max_steps <= 0:
        args.max_steps = 6
    records = synthetic(args.examples + args.eval_examples, seed=0)
    train, held_out = records[: args.examples], records[args.examples :]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        data, eval_data = Path(scratch) / "train.jsonl", Path(scratch) / "eval.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in train))
        eval_data.write_text("".join(json.dumps(r) + "\n" for r in held_out))
        for variant in args.variants.split(","):
            print(f"running {LABELS[variant]}...", file=sys.stderr, flush=True)
            results[variant] = _child(variant, args, data, eval_data)

    config = (
        f"{args.examples} examples, max_length {args.max_length}, batch {args.batch_size}, "
        f"LoRA r={args.rank} q/k/v/o, lr {args.learning_rate}, "
        + (f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.epochs:g} epoch(s)")
    )
    print(f"\nSFT throughput ({config})\n")
    print("| variant | steps | train s | steps/s | tokens/s | train loss | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        print(
            f"| {LABELS[variant]} | {r['steps']} | {r['train_seconds']} | {r['steps_per_s']} "
            f"| {r['tokens_per_s']} | {r['train_loss']} | {r['load_average_before']} |"
        )
    for baseline in ("plain-fp32", "plain"):
        base_figures = results.get(baseline)
        if not base_figures:
            continue
        for variant, r in results.items():
            if not variant.startswith("plain"):
                print(
                    f"\nratio {LABELS[variant]} / {LABELS[baseline]}: steps/s "
                    f"{r['steps_per_s'] / base_figures['steps_per_s']:.2f}, tokens/s "
                    f"{r['tokens_per_s'] / base_figures['tokens_per_s']:.2f}"
                )
    flywheel = results.get("flywheel")
    if flywheel and flywheel.get("eval_loss_before") is not None:
        print(
            f"\ntrain_sft call: {flywheel['total_seconds']} s in all (loading, evaluation and "
            f"saving included); held-out loss ({args.eval_examples} records) "
            f"{flywheel['eval_loss_before']:.4f} -> {flywheel['eval_loss_after']:.4f}; "
            f"peak RSS {flywheel['peak_memory_mib']} MiB"
        )
    print(f"\nmachine: {json.dumps(describe())}")
    if args.json:
        args.json.write_text(
            json.dumps({"config": config, "machine": describe(), "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
