"""Merge a LoRA adapter into its base, giving an ordinary model folder.

An adapter trained on a 4-bit NF4 base (QLoRA) learned corrections to the *quantized*
weights, so the base is loaded the same way and dequantized before merging: the merged model
then computes what the trained adapter computed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from flywheel.tuning.measure import (
    DEFAULT_NEW_TOKENS,
    finish_step,
    load_tokenizer,
    measure_model,
    size_on_disk,
)
from flywheel.tuning.report import Cancelled, Reporter
from flywheel.tuning.train import nf4_config, read_training_info

MERGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _load_base(base_dir: Path, quantization: str) -> Any:
    from transformers import AutoModelForCausalLM

    if quantization == "nf4":
        model = AutoModelForCausalLM.from_pretrained(
            str(base_dir),
            quantization_config=nf4_config(),
            device_map={"": "cpu"},
            dtype=torch.float32,
            local_files_only=True,
        )
        # transformers drops the quantization config too, so it saves as a plain float model
        model = model.dequantize(dtype=torch.float32)
        return model
    return AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, local_files_only=True
    )


def load_adapted(base_dir: Path, adapter_dir: Path) -> Any:
    """The base (dequantized when the adapter was trained on NF4) with the adapter applied,
    unmerged, in eval mode."""
    from peft import PeftModel

    info = read_training_info(adapter_dir)
    base = _load_base(Path(base_dir), info.get("quantization", "none"))
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    output_dir: Path,
    reporter: Reporter,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    eval_records: Sequence[dict[str, Any]] | None = None,
    prompts: Sequence[Any] | None = None,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
) -> dict[str, Any]:
    """Merge the PEFT adapter in ``adapter_dir`` into the base in ``base_dir`` and save the
    result (safetensors, tokenizer, generation config) to ``output_dir``, loadable with
    ``AutoModelForCausalLM.from_pretrained``.

    With ``eval_records`` the result has ``before`` (base plus unmerged adapter) and ``after``
    (the merged folder) measurements from :func:`~flywheel.tuning.measure.measure_model`.
    """
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(MERGE_DTYPES)}, not {dtype!r}")
    base_dir, adapter_dir, output_dir = Path(base_dir), Path(adapter_dir), Path(output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} holds no PEFT adapter (adapter_config.json)")
    started = time.perf_counter()
    info = read_training_info(adapter_dir)
    quantization = info.get("quantization", "none")
    reporter.progress(0.0, "loading the base and the adapter")
    reporter.log(
        f"merging {adapter_dir.name} into {base_dir.name}"
        + (" (dequantized NF4 base, as trained)" if quantization == "nf4" else "")
    )
    model = load_adapted(base_dir, adapter_dir)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    result: dict[str, Any] = {"dtype": dtype, "base_quantization": quantization}
    if eval_records is not None:
        reporter.progress(0.1, "measuring the unmerged model")
        result["before"] = measure_model(
            base_dir,
            eval_records,
            prompts,
            max_new_tokens=max_new_tokens,
            model=model,
            tokenizer=tokenizer,
            size_bytes=size_on_disk(base_dir) + size_on_disk(adapter_dir),
        )
    if reporter.cancelled():
        raise Cancelled("cancelled before merging")
    reporter.progress(0.4, "merging")
    merged = model.merge_and_unload().to(MERGE_DTYPES[dtype])
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    reporter.progress(0.7, "saved the merged model")
    del model, merged
    finish_step(result, output_dir, started, eval_records, prompts, max_new_tokens)
    reporter.progress(1.0, "merged")
    reporter.log(f"merged model saved to {output_dir} ({result['size_bytes']:,} bytes)")
    return result
