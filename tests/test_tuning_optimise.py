"""The optimisation steps on the real SmolLM2 weights: merge an adapter, quantize, prune, and
the before/after measurements they record."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flywheel.providers.local_model import materialize_model
from flywheel.tuning.config import TrainSettings
from flywheel.tuning.data import sft_records
from flywheel.tuning.measure import eval_loss, load_tokenizer, size_on_disk
from flywheel.tuning.merge import load_adapted, merge_adapter
from flywheel.tuning.prune import prune_model
from flywheel.tuning.quantize import QuantizationUnavailable, quantize_model
from flywheel.tuning.report import RecordingReporter
from flywheel.tuning.train import train_sft

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("FLYWHEEL_MODEL_CACHE", REPO / ".cache" / "models"))
RECORDS = sft_records(
    [
        {
            "messages": [{"role": "user", "content": f"What is the code for {name}?"}],
            "expected": f"The code for {name} is QX-{index}.",
        }
        for index, name in enumerate(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"])
    ]
)
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
# Cheap before/after measurements: one prompt, a few greedy tokens.
MEASURE = {"prompts": ["Hi"], "max_new_tokens": 4}


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return materialize_model("builtin:smollm2", MODEL_CACHE)


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained adapter (a high learning rate, so it clearly changes the logits)."""
    settings = TrainSettings(max_steps=2, batch_size=4, max_length=64, learning_rate=3e-3)
    output = tmp_path_factory.mktemp("adapter")
    train_sft(base_dir, RECORDS[:4], [], settings, output, RecordingReporter())
    return output


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"}).eval()


def generate(model, tokenizer) -> str:
    ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_merge_equals_base_plus_adapter(base_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    result = merge_adapter(
        base_dir, adapter_dir, tmp_path / "merged", reporter, eval_records=RECORDS[4:], **MEASURE
    )
    merged_dir = Path(result["output_dir"])
    assert (merged_dir / "model.safetensors").is_file()
    assert (merged_dir / "generation_config.json").is_file()
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())

    tokenizer = load_tokenizer(merged_dir)
    ids = tokenizer.apply_chat_template(PROMPT, return_tensors="pt", return_dict=True)
    merged = load(merged_dir)
    adapted = load_adapted(base_dir, adapter_dir)
    base = load(base_dir)
    with torch.no_grad():
        merged_logits = merged(**ids).logits
        adapted_logits = adapted(**ids).logits
        base_logits = base(**ids).logits
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-2)  # the adapter did change it
    assert generate(merged, tokenizer).strip()

    before, after = result["before"], result["after"]
    assert before["eval_loss"] == pytest.approx(after["eval_loss"], rel=1e-3)
    assert before["size_bytes"] == size_on_disk(base_dir) + size_on_disk(adapter_dir)
    assert after["size_bytes"] == size_on_disk(merged_dir) == result["size_bytes"]
    assert before["tokens_per_second"] > 0 and after["tokens_per_second"] > 0
    assert reporter.fractions[-1] == 1.0


def test_merge_refuses_a_folder_without_an_adapter(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no PEFT adapter"):
        merge_adapter(base_dir, base_dir, tmp_path / "out", RecordingReporter())


@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4", "torchao-int8"])
def test_quantized_models_reload_and_generate(base_dir: Path, tmp_path: Path, method: str) -> None:
    measured = method == "bnb-nf4"  # before/after once; the other methods check size only
    result = quantize_model(
        base_dir,
        tmp_path / method,
        method,
        RecordingReporter(),
        eval_records=RECORDS if measured else None,
        **MEASURE,
    )
    folder = Path(result["output_dir"])
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] in {"bitsandbytes", "torchao"}
    assert result["size_bytes"] < 0.6 * size_on_disk(base_dir)

    model = load(folder)  # from the saved quantization config alone
    linear = model.model.layers[0].self_attn.q_proj
    assert (
        type(linear).__name__ in {"Linear8bitLt", "Linear4bit"}
        or "Int8" in type(linear.weight).__name__
    )
    tokenizer = load_tokenizer(folder)
    assert "Paris" in generate(model, tokenizer)
    loss = eval_loss(model, tokenizer, RECORDS, max_length=64)
    assert math.isfinite(loss) and loss < 10
    if measured:
        before, after = result["before"], result["after"]
        assert after["size_bytes"] < before["size_bytes"]
        assert after["eval_loss"] == pytest.approx(before["eval_loss"], rel=0.25)


def test_unavailable_methods_say_what_is_missing(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("gptqmodel") is None:
        with pytest.raises(QuantizationUnavailable, match="pip install gptqmodel"):
            quantize_model(base_dir, tmp_path / "gptq", "gptq", RecordingReporter())
    monkeypatch.setenv("FLYWHEEL_LLAMA_CPP", str(tmp_path / "no-llama"))
    with pytest.raises(QuantizationUnavailable, match="FLYWHEEL_LLAMA_CPP"):
        quantize_model(base_dir, tmp_path / "gguf", "gguf", RecordingReporter())
    monkeypatch.delenv("FLYWHEEL_LLAMA_CPP")
    if shutil.which("convert_hf_to_gguf.py") is None and shutil.which("convert_hf_to_gguf") is None:
        with pytest.raises(QuantizationUnavailable, match=r"convert_hf_to_gguf\.py"):
            quantize_model(base_dir, tmp_path / "gguf", "gguf", RecordingReporter())
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_model(base_dir, tmp_path / "x", "int3", RecordingReporter())


def test_magnitude_pruning_reaches_the_amount(base_dir: Path, tmp_path: Path) -> None:
    result = prune_model(
        base_dir,
        tmp_path / "pruned",
        "magnitude",
        0.3,
        RecordingReporter(),
        eval_records=RECORDS,
        **MEASURE,
    )
    kinds = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(result["sparsity"]) == kinds
    assert all(value == pytest.approx(0.3, abs=0.01) for value in result["sparsity"].values())
    assert result["overall_sparsity"] == pytest.approx(0.3, abs=0.01)

    pruned, base = load(Path(result["output_dir"])), load(base_dir)
    q_proj = pruned.model.layers[3].self_attn.q_proj.weight
    assert (q_proj == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    # the smallest weights went: every zeroed weight was no larger than every kept one
    original = base.model.layers[3].self_attn.q_proj.weight
    assert original[q_proj == 0].abs().max() <= original[q_proj != 0].abs().min()
    # embeddings (and the tied head) are untouched
    assert torch.equal(pruned.model.embed_tokens.weight, base.model.embed_tokens.weight)
    before, after = result["before"], result["after"]
    assert math.isfinite(before["eval_loss"]) and math.isfinite(after["eval_loss"])
    assert after["eval_loss"] != before["eval_loss"]  # measured on the pruned weights
    # a pruned folder stays dense: the zeros take as much room as the weights did
    assert after["size_bytes"] == pytest.approx(before["size_bytes"], rel=0.01)


def test_two_four_pruning_keeps_two_of_every_four(base_dir: Path, tmp_path: Path) -> None:
    result = prune_model(base_dir, tmp_path / "sparse", "2:4", reporter=RecordingReporter())
    assert result["overall_sparsity"] == pytest.approx(0.5, abs=0.001)
    pruned, base = load(Path(result["output_dir"])), load(base_dir)
    for index in (0, 29):
        layer, original_layer = pruned.model.layers[index], base.model.layers[index]
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            weight = layer.get_submodule(name).weight
            original = original_layer.get_submodule(name).weight
            groups = weight.reshape(weight.shape[0], -1, 4)
            assert ((groups != 0).sum(-1) <= 2).all(), name
            # the two kept ones are the two largest of their group
            kept = (groups != 0).float()
            magnitudes = original.abs().reshape_as(groups)
            smallest_kept = torch.where(kept.bool(), magnitudes, torch.inf).min(-1).values
            largest_dropped = torch.where(kept.bool(), -torch.inf, magnitudes).max(-1).values
            assert (smallest_kept >= largest_dropped).all(), name
