"""Magnitude pruning of a model's decoder linear layers with ``torch.nn.utils.prune``.

``magnitude`` zeroes the ``amount`` smallest weights of each layer (L1, unstructured); ``2:4``
keeps the two largest of every four consecutive weights along the input dimension (the
pattern sparse tensor cores accelerate). Embeddings and the output head are left alone. The
zeros are made permanent (``prune.remove``); the saved folder is an ordinary dense model, so
its size on disk does not shrink.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.utils import prune

from flywheel.tuning.measure import (
    DEFAULT_NEW_TOKENS,
    finish_step,
    load_tokenizer,
    measure_model,
)
from flywheel.tuning.report import Cancelled, Reporter

PRUNE_METHODS = ("magnitude", "2:4")


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask keeping the two largest-magnitude weights in every group of four
    consecutive weights along the input (last) dimension."""
    rows, columns = weight.shape
    if columns % 4:
        raise ValueError(f"2:4 pruning needs an input dimension divisible by 4, not {columns}")
    groups = weight.detach().abs().reshape(rows, columns // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=weight.dtype).scatter_(-1, keep, 1.0)
    return mask.reshape(rows, columns)


def decoder_linears(model: Any) -> list[tuple[str, torch.nn.Linear]]:
    """The ``nn.Linear`` layers inside the decoder blocks (not embeddings or the head)."""
    layers = model.get_decoder().layers
    found = []
    for index, block in enumerate(layers):
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                found.append((f"layers.{index}.{name}", module))
    return found


def prune_model(
    model_dir: Path,
    output_dir: Path,
    method: Literal["magnitude", "2:4"],
    amount: float = 0.5,
    reporter: Reporter | None = None,
    eval_records: Sequence[dict[str, Any]] | None = None,
    prompts: Sequence[Any] | None = None,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
) -> dict[str, Any]:
    """Prune the decoder linear layers of the float model in ``model_dir`` and save it to
    ``output_dir``. Returns the achieved sparsity per kind of layer (``q_proj``,
    ``down_proj``...) and overall, and with ``eval_records`` ``before``/``after`` measurements.
    ``amount`` is ignored by ``2:4``, which always removes half."""
    from transformers import AutoModelForCausalLM

    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PRUNE_METHODS)}, not {method!r}")
    if not 0 < amount < 1:
        raise ValueError("amount must be between 0 and 1")
    if reporter is None:
        from flywheel.tuning.report import RecordingReporter

        reporter = RecordingReporter()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    started = time.perf_counter()
    result: dict[str, Any] = {"method": method, "amount": 0.5 if method == "2:4" else amount}
    if method == "2:4" and amount != 0.5:
        reporter.log(f"2:4 pruning always removes half the weights; amount {amount} ignored")
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True
    )
    if getattr(model.config, "quantization_config", None):
        raise ValueError(f"{model_dir} is quantized; prune the float model, then quantize")
    tokenizer = load_tokenizer(model_dir)
    if eval_records is not None:
        reporter.progress(0.05, "measuring the model before pruning")
        result["before"] = measure_model(
            model_dir,
            eval_records,
            prompts,
            max_new_tokens=max_new_tokens,
            model=model,
            tokenizer=tokenizer,
        )
    layers = decoder_linears(model)
    zeros: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for position, (name, module) in enumerate(layers):
        if reporter.cancelled():
            raise Cancelled("cancelled while pruning")
        if method == "magnitude":
            prune.l1_unstructured(module, "weight", amount=amount)
        else:
            prune.custom_from_mask(module, "weight", two_four_mask(module.weight))
        prune.remove(module, "weight")
        kind = name.rsplit(".", 1)[-1]
        zeros[kind] = zeros.get(kind, 0) + int((module.weight == 0).sum().item())
        sizes[kind] = sizes.get(kind, 0) + module.weight.numel()
        reporter.progress(0.1 + 0.6 * (position + 1) / len(layers), f"pruned {name}")
    result["sparsity"] = {kind: zeros[kind] / sizes[kind] for kind in sorted(sizes)}
    result["overall_sparsity"] = sum(zeros.values()) / max(sum(sizes.values()), 1)
    result["layers"] = len(layers)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    finish_step(
        result,
        output_dir,
        started,
        eval_records,
        prompts,
        max_new_tokens,
        model=model.eval(),
        tokenizer=tokenizer,
    )
    reporter.progress(1.0, "pruned")
    reporter.log(
        f"pruned {len(layers)} layers ({method}): {result['overall_sparsity']:.1%} of their "
        f"weights are zero; saved to {output_dir}"
    )
    return result
