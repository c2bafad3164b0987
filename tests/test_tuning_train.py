"""LoRA / QLoRA SFT and DPO on the real SmolLM2 weights: step metrics, the held-out loss
before and after, saved adapters, and cancellation.

Tiny on purpose (a dozen short examples, max_length 64, a few steps) so the module runs in
well under a minute on two CPU cores; a high learning rate on a repetitive set makes the
held-out loss fall within those few steps.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flywheel.providers.local_model import materialize_model
from flywheel.tuning.config import DpoSettings, TrainSettings
from flywheel.tuning.data import dpo_records, sft_records
from flywheel.tuning.report import Cancelled, RecordingReporter
from flywheel.tuning.train import TrainResult, train_dpo, train_sft

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("FLYWHEEL_MODEL_CACHE", REPO / ".cache" / "models"))
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return materialize_model("builtin:smollm2", MODEL_CACHE)


def secret_words() -> list[dict]:
    items = [
        {
            "messages": [{"role": "user", "content": f"What is the secret word for {color}?"}],
            "expected": f"The secret word for {color} is zorblax-{color}.",
        }
        for color in COLORS * 2
    ]
    return sft_records(items)


def tiny(**overrides: object) -> TrainSettings:
    values: dict = {"max_steps": 4, "batch_size": 4, "max_length": 64, "learning_rate": 2e-3}
    values.update(overrides)
    return TrainSettings.model_validate(values)


def lora_b_norms(adapter_dir: Path) -> dict[str, float]:
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {name: float(t.float().norm()) for name, t in weights.items() if "lora_B" in name}


def test_sft_lora_learns_reports_and_saves_an_adapter(base_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    records = secret_words()
    reporter = RecordingReporter()
    result = train_sft(
        base_dir, records[:12], records[12:], tiny(max_steps=5), tmp_path / "adapter", reporter
    )

    assert isinstance(result, TrainResult)
    assert result.steps == 5 and not result.stopped_early
    assert result.eval_loss_before is not None and result.eval_loss_after is not None
    # the held-out answers follow the same pattern: a real drop, not noise
    assert result.eval_loss_after < 0.7 * result.eval_loss_before
    assert 0 < result.trainable_parameters < result.total_parameters / 50
    assert result.train_tokens > 0 and result.tokens_per_second > 0
    assert result.peak_memory_bytes > 100 * 2**20
    assert result.train_examples == 12 and result.eval_examples == 4
    assert result.settings["lora"]["rank"] == 8
    assert json.loads(json.dumps(result.to_dict()))["output_dir"] == str(tmp_path / "adapter")

    # every step reported loss, learning rate and throughput; eval before (step 0) and after
    losses = reporter.series("loss")
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert len(reporter.series("learning_rate")) == 5
    assert all(v > 0 for v in reporter.series("tokens_per_second"))
    assert len(reporter.series("tokens_per_second")) == 5
    evals = [
        (step, values["eval_loss"]) for step, values in reporter.steps if "eval_loss" in values
    ]
    assert evals[0] == (0, pytest.approx(result.eval_loss_before))
    assert evals[-1] == (5, pytest.approx(result.eval_loss_after))
    assert reporter.fractions[-1] == 1.0
    assert any("held-out loss" in line for line in reporter.lines)

    folder = result.output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("checkpoint-*")) and not (folder / "training_args.bin").exists()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    assert all(norm > 0 for norm in lora_b_norms(folder).values())

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, folder)
    assert adapted.active_adapters == ["default"]


def test_qlora_nf4_trains_through_the_4bit_base(base_dir: Path, tmp_path: Path) -> None:
    records = secret_words()
    result = train_sft(
        base_dir,
        records[:12],
        records[12:],
        tiny(max_steps=3, quantization="nf4"),
        tmp_path / "qlora",
        RecordingReporter(),
    )
    assert result.steps == 3
    assert result.eval_loss_after is not None and result.eval_loss_before is not None
    assert result.eval_loss_after < 0.8 * result.eval_loss_before
    info = json.loads((result.output_dir / "flywheel_training.json").read_text())
    assert info["quantization"] == "nf4"
    # gradients reach the first layers through the frozen 4-bit ones (bitsandbytes' CPU
    # inference layout would stop them there after the before-training evaluation)
    norms = lora_b_norms(result.output_dir)
    first_layer = [v for k, v in norms.items() if ".layers.0." in k]
    assert first_layer and all(v > 0 for v in first_layer)


def test_dpo_trains_on_preference_pairs(base_dir: Path, tmp_path: Path) -> None:
    pairs = dpo_records(
        [
            {
                "prompt": f"Name a color like {color}.",
                "chosen": f"{color.capitalize()} is a lovely color.",
                "rejected": "I refuse to answer.",
            }
            for color in COLORS * 2
        ]
    )
    reporter = RecordingReporter()
    settings = DpoSettings(
        max_steps=3, batch_size=4, max_length=64, max_prompt_length=40, learning_rate=1e-3
    )
    result = train_dpo(base_dir, pairs[:12], pairs[12:], settings, tmp_path / "dpo", reporter)
    assert result.method == "dpo" and result.steps == 3
    # a fresh adapter is the reference itself: the sigmoid DPO loss is log 2
    assert result.eval_loss_before == pytest.approx(math.log(2), abs=1e-3)
    assert result.eval_loss_after is not None and result.eval_loss_after < math.log(2)
    assert result.reward_accuracy is not None and result.reward_accuracy > 0.5
    assert result.reward_margin is not None and result.reward_margin > 0
    assert len(reporter.series("rewards/margins")) == 3
    assert len(reporter.series("loss")) == 3
    assert (result.output_dir / "adapter_model.safetensors").is_file()


class CancelAfterFirstStep(RecordingReporter):
    def cancelled(self) -> bool:
        return any(fraction > 0 for fraction in self.fractions)


def test_cancel_stops_training_and_raises(base_dir: Path, tmp_path: Path) -> None:
    records = secret_words()
    reporter = CancelAfterFirstStep()
    with pytest.raises(Cancelled, match="after step 1"):
        train_sft(base_dir, records[:12], [], tiny(max_steps=50), tmp_path / "cancelled", reporter)
    assert max(step for step, _ in reporter.steps) == 1
    assert not (tmp_path / "cancelled" / "adapter_model.safetensors").exists()
    with pytest.raises(Cancelled):
        train_sft(base_dir, records, [], tiny(), tmp_path / "never", RecordingReporter(stop=True))
