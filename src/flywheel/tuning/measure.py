"""What an optimisation step changes: size on disk, generation speed and held-out loss.

Merge, quantize and prune record :func:`measure_model` before and after, so every step of the
optimisation recipe says what it cost and what it bought.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch

# Greedy decoding of this many new tokens per prompt when measuring speed.
DEFAULT_NEW_TOKENS = 32
DEFAULT_PROMPTS = (
    "Explain in two sentences what a database index is.",
    "Write a short, friendly reply to a customer asking where their order is.",
)


def size_on_disk(path: Path | str) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def load_causal_lm(model_dir: Path | str, dtype: torch.dtype | None = None) -> Any:
    """A model folder loaded for inference as Flywheel's local provider would: with its saved
    quantization config (bitsandbytes, torchao), on CPU or the first GPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    kwargs: dict[str, Any] = {"local_files_only": True, "device_map": {"": device}}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model.eval()
    return model


def load_tokenizer(model_dir: Path | str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _labelled(tokenizer: Any, record: Any, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss is taken) for one record.

    Conversational records (``{"messages": [...]}`` ending with the assistant) are scored on
    the final assistant turn only, as SFT trains them; text (a string or ``{"text": ...}``)
    is scored on every token.
    """
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        start = 0
        while start < min(len(prompt), len(full)) and prompt[start] == full[start]:
            start += 1
        ids = list(full)[:max_length]
        labels = [-100] * min(start, len(ids)) + ids[start:]
        return ids, labels
    text = record["text"] if isinstance(record, dict) else str(record)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
    return list(ids), list(ids)


@torch.no_grad()
def eval_loss(
    model_or_dir: Any,
    tokenizer: Any,
    records: Sequence[Any],
    max_length: int = 256,
    batch_size: int = 8,
) -> float:
    """Mean per-token cross-entropy of ``records`` (assistant answers of conversational
    records, every token of text records); ``nan`` when no record has a token to score."""
    model = load_causal_lm(model_or_dir) if isinstance(model_or_dir, str | Path) else model_or_dir
    if tokenizer is None:
        tokenizer = load_tokenizer(model_or_dir)
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = [_labelled(tokenizer, record, max_length) for record in records]
    examples = [e for e in examples if any(label != -100 for label in e[1][1:])]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (tokens, token_labels) in enumerate(batch):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                labels[row, : len(token_labels)] = torch.tensor(token_labels)
                mask[row, : len(tokens)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            shifted = logits[:, :-1].float()
            targets = labels[:, 1:].to(device)
            total += torch.nn.functional.cross_entropy(
                shifted.reshape(-1, shifted.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
            count += int((targets != -100).sum().item())
    finally:
        model.train(was_training)
    return total / count if count else math.nan


def _prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    if getattr(tokenizer, "chat_template", None):
        return list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
    return list(tokenizer(messages[-1]["content"])["input_ids"])


@torch.no_grad()
def generation_speed(
    model_or_dir: Any,
    prompts: Sequence[Any] = DEFAULT_PROMPTS,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    tokenizer: Any = None,
) -> float:
    """Greedy decoding speed in new tokens per second, one prompt at a time (each prompt
    produces exactly ``max_new_tokens``; a short warm-up run is not counted)."""
    model = load_causal_lm(model_or_dir) if isinstance(model_or_dir, str | Path) else model_or_dir
    if tokenizer is None:
        tokenizer = load_tokenizer(model_or_dir)
    device = _device(model)
    encoded = [torch.tensor([_prompt_ids(tokenizer, p)], device=device) for p in prompts]
    if not encoded:
        raise ValueError("generation_speed needs at least one prompt")

    def run(ids: torch.Tensor, tokens: int) -> int:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return int(out.shape[1] - ids.shape[1])

    run(encoded[0], 2)  # first call pays for lazy initialisation (kernels, caches)
    started = time.perf_counter()
    produced = sum(run(ids, max_new_tokens) for ids in encoded)
    return produced / (time.perf_counter() - started)


def measure_model(
    model_dir: Path | str,
    eval_records: Sequence[Any] | None = None,
    prompts: Sequence[Any] | None = None,
    *,
    max_length: int = 256,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    model: Any = None,
    tokenizer: Any = None,
    size_bytes: int | None = None,
) -> dict[str, Any]:
    """Size on disk, greedy tokens/s and (with ``eval_records``) held-out loss of a model
    folder. ``model``/``tokenizer`` reuse an already loaded model (e.g. an unmerged PEFT model),
    ``size_bytes`` overrides the folder size (base plus adapter)."""
    if model is None:
        model = load_causal_lm(model_dir)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_dir)
    result: dict[str, Any] = {
        "size_bytes": size_bytes if size_bytes is not None else size_on_disk(model_dir),
        "tokens_per_second": generation_speed(
            model, prompts or DEFAULT_PROMPTS, max_new_tokens, tokenizer
        ),
        "eval_loss": None,
    }
    if eval_records:
        result["eval_loss"] = eval_loss(model, tokenizer, eval_records, max_length)
    return result


def finish_step(
    result: dict[str, Any],
    output_dir: Path,
    started: float,
    eval_records: Sequence[Any] | None,
    prompts: Sequence[Any] | None,
    max_new_tokens: int,
    *,
    measure_after: bool = True,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """The common end of merge, quantize and prune: with ``eval_records``, ``after`` measures
    the saved model (or the ``model`` still in memory), and the result records the output
    folder, its size on disk and the step's seconds since ``started`` (``perf_counter``)."""
    if eval_records is not None and measure_after:
        result["after"] = measure_model(
            output_dir,
            eval_records,
            prompts,
            max_new_tokens=max_new_tokens,
            model=model,
            tokenizer=tokenizer,
        )
    result.update(
        output_dir=str(output_dir),
        size_bytes=size_on_disk(output_dir),
        seconds=time.perf_counter() - started,
    )
    return result


class PeakMemory:
    """The peak memory of this process while a block runs: resident set size sampled on a
    background thread (CPU), or ``torch.cuda.max_memory_allocated`` (GPU)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda = torch.cuda.is_available()

    def sample(self) -> None:
        """Take one sample now (also called from training callbacks)."""
        if self._cuda:
            self.peak_bytes = max(self.peak_bytes, int(torch.cuda.max_memory_allocated()))
        else:
            self.peak_bytes = max(self.peak_bytes, int(psutil.Process().memory_info().rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="flywheel-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(threads)`` (when given), then restore."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
