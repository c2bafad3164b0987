"""Quantize a model folder for deployment.

``bnb-int8`` / ``bnb-nf4`` (bitsandbytes) and ``torchao-int8`` (weight-only int8) save a
folder that reloads with ``AutoModelForCausalLM.from_pretrained`` from its saved quantization
config; ``gptq`` needs the ``gptqmodel`` package and calibration texts; ``gguf`` runs
llama.cpp's ``convert_hf_to_gguf.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flywheel.tuning.measure import (
    DEFAULT_NEW_TOKENS,
    finish_step,
    load_tokenizer,
    measure_model,
)
from flywheel.tuning.report import Cancelled, Reporter
from flywheel.tuning.train import nf4_config

METHODS = ("bnb-int8", "bnb-nf4", "torchao-int8", "gptq", "gguf")
GGUF_SCRIPT = "convert_hf_to_gguf.py"
# Texts GPTQ calibrates on when the caller gives none and has no held-out records.
_DEFAULT_CALIBRATION = (
    "The quick brown fox jumps over the lazy dog.",
    "Customer: Where is my order? Agent: Let me check the tracking number for you.",
    "To reset your password, open the settings page and choose 'Forgot password'.",
    "A database index makes lookups faster at the cost of slower writes.",
)


class QuantizationUnavailable(RuntimeError):
    """The method needs a package or tool that is not installed; the message says which."""


def _from_pretrained(model_dir: Path, config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        quantization_config=config,
        device_map={"": device},
        dtype=torch.float32,
        local_files_only=True,
    )


def _bnb_int8() -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _bnb_nf4() -> Any:
    from flywheel.providers.local_model import resolve_dtype

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    # The 4-bit weights are dequantized per matmul; bfloat16 compute where it is fast.
    return nf4_config(resolve_dtype("auto", device))


def _torchao_int8() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _gptq(model_dir: Path, texts: Sequence[str]) -> Any:
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        raise QuantizationUnavailable(
            "GPTQ needs the gptqmodel package: pip install gptqmodel"
        ) from None
    from transformers import GPTQConfig

    return GPTQConfig(bits=4, dataset=list(texts), tokenizer=load_tokenizer(model_dir))


def find_gguf_converter() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py``: from ``FLYWHEEL_LLAMA_CPP`` (the script or a
    llama.cpp checkout holding it) or on ``PATH``."""
    configured = os.environ.get("FLYWHEEL_LLAMA_CPP")
    if configured:
        path = Path(configured).expanduser()
        script = path / GGUF_SCRIPT if path.is_dir() else path
        if script.is_file():
            return script
        raise QuantizationUnavailable(
            f"FLYWHEEL_LLAMA_CPP={configured} holds no {GGUF_SCRIPT} (point it at a llama.cpp "
            "checkout or at the script)"
        )
    found = shutil.which(GGUF_SCRIPT) or shutil.which(GGUF_SCRIPT.removesuffix(".py"))
    if found:
        return Path(found)
    raise QuantizationUnavailable(
        f"GGUF export needs llama.cpp's {GGUF_SCRIPT}: clone https://github.com/ggml-org/llama.cpp "
        "and set FLYWHEEL_LLAMA_CPP to the checkout (or put the script on PATH)"
    )


def _gguf(model_dir: Path, output_dir: Path, gguf_type: str, reporter: Reporter) -> Path:
    script = find_gguf_converter()
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"model-{gguf_type}.gguf"
    command = [sys.executable, str(script), str(model_dir), "--outfile", str(target)]
    command += ["--outtype", gguf_type]
    reporter.log(f"running {script.name} --outtype {gguf_type}")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not target.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{script.name} failed ({done.returncode}): " + " | ".join(tail))
    return target


def quantize_model(
    model_dir: Path,
    output_dir: Path,
    method: str,
    reporter: Reporter,
    calibration_texts: Sequence[str] | None = None,
    eval_records: Sequence[dict[str, Any]] | None = None,
    prompts: Sequence[Any] | None = None,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    gguf_type: str = "q8_0",
) -> dict[str, Any]:
    """Quantize the model in ``model_dir`` into ``output_dir`` with ``method`` (one of
    :data:`METHODS`).

    Raises :class:`QuantizationUnavailable` when the method's package or tool is missing. With
    ``eval_records`` the result has ``before`` and ``after`` measurements (size on disk, greedy
    tokens/s, held-out loss); for ``gguf`` ``after`` is left out (llama.cpp runs GGUF files,
    Flywheel's local provider converts them back to floats).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model folder (no config.json)")
    started = time.perf_counter()
    result: dict[str, Any] = {"method": method}
    if method == "gguf":
        find_gguf_converter()  # fail before measuring anything
    elif method == "gptq":
        texts = list(calibration_texts or [])
        if not texts and eval_records:
            texts = [
                " ".join(m["content"] for m in record["messages"])
                for record in eval_records
                if "messages" in record
            ]
        config = _gptq(model_dir, texts or list(_DEFAULT_CALIBRATION))
    else:
        config = {"bnb-int8": _bnb_int8, "bnb-nf4": _bnb_nf4, "torchao-int8": _torchao_int8}[
            method
        ]()
    if eval_records is not None:
        reporter.progress(0.05, "measuring the model before quantization")
        result["before"] = measure_model(
            model_dir, eval_records, prompts, max_new_tokens=max_new_tokens
        )
    if reporter.cancelled():
        raise Cancelled("cancelled before quantizing")
    reporter.progress(0.3, f"quantizing with {method}")
    reporter.log(f"quantizing {model_dir.name} with {method}")
    if method == "gguf":
        result["file"] = str(_gguf(model_dir, output_dir, gguf_type, reporter))
        result["gguf_type"] = gguf_type
    else:
        model = _from_pretrained(model_dir, config)
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(output_dir))
        load_tokenizer(model_dir).save_pretrained(str(output_dir))
        del model
        reporter.progress(0.7, "saved the quantized model")
    finish_step(
        result,
        output_dir,
        started,
        eval_records,
        prompts,
        max_new_tokens,
        measure_after=method != "gguf",
    )
    reporter.progress(1.0, "quantized")
    reporter.log(f"{method} model saved to {output_dir} ({result['size_bytes']:,} bytes)")
    return result
