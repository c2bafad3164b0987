"""The baseline for the SFT throughput bench: a plain TRL + PEFT LoRA script.

What someone would write from the TRL documentation: ``SFTTrainer`` on the model folder with
an ``SFTConfig`` holding the hyperparameters and a ``LoraConfig``, everything else at TRL's
defaults. It trains on the same prompt/completion records as ``train_sft`` and prints one JSON
line with the timings, measured by :class:`StepTimer` exactly as for ``train_sft``.

    python bench/tuning/plain_trl_sft.py --base DIR --data train.jsonl [--max-steps N] [--fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall time of the training loop (train begin to end: no model loading, no evaluation
    outside it), optimizer steps, and the non-padding tokens the trainer counted."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds = 0.0
        self.steps = 0
        self.tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.seconds = time.perf_counter() - self.started
        self.steps = state.global_step
        self.tokens = state.num_input_tokens_seen

    def figures(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "train_seconds": round(self.seconds, 2),
            "tokens": self.tokens,
            "steps_per_s": round(self.steps / self.seconds, 4),
            "tokens_per_s": round(self.tokens / self.seconds, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="model folder")
    parser.add_argument("--data", type=Path, required=True, help="prompt/completion JSONL")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument(
        "--fp32", action="store_true", help="bf16=False: full precision, as train_sft on CPU"
    )
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    records = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output:
        trainer = SFTTrainer(
            model=str(args.base),
            args=SFTConfig(
                output_dir=output,
                per_device_train_batch_size=args.batch_size,
                num_train_epochs=args.epochs,
                max_steps=args.max_steps,
                learning_rate=args.learning_rate,
                max_length=args.max_length,
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
                use_cpu=not torch.cuda.is_available(),  # TRL's bf16 default demands it on CPU
                bf16=not args.fp32,
                # counting only; the same count train_sft reports
                include_num_input_tokens_seen="non_padding",
            ),
            train_dataset=Dataset.from_list(records),
            peft_config=LoraConfig(
                r=args.rank,
                lora_alpha=args.alpha,
                lora_dropout=0.05,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                task_type="CAUSAL_LM",
            ),
            callbacks=[timer],
        )
        outcome = trainer.train()
        trainer.save_model(output)
    figures: dict[str, Any] = timer.figures()
    figures["train_loss"] = round(outcome.training_loss, 4)
    figures["total_seconds"] = round(time.perf_counter() - started, 2)
    figures["bf16"] = trainer.args.bf16
    figures["gradient_checkpointing"] = trainer.args.gradient_checkpointing
    print("RESULT " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
