"""LoRA / QLoRA fine-tuning with TRL: supervised (SFT) and preference (DPO) training.

Both load the base from a local folder (nothing from a hub), train a PEFT LoRA adapter with
TRL's trainer, report every logged step to a :class:`~flywheel.tuning.report.Reporter`, measure
the held-out loss before and after, and save only the final adapter (no checkpoints).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from flywheel.tuning.config import DpoSettings, TrainSettings
from flywheel.tuning.measure import PeakMemory, torch_threads
from flywheel.tuning.report import Cancelled, Reporter

# Written next to the adapter: how it was trained (merge reads the base's quantization).
TRAINING_INFO_FILE = "flywheel_training.json"
# TRL/transformers log keys that describe the logger rather than the training.
_NOISE_SUFFIXES = (
    "_runtime",
    "_per_second",
    "total_flos",
    "num_input_tokens_seen",
    "model_preparation_time",
)


@dataclass
class TrainResult:
    """What a training run produced and how it went."""

    output_dir: Path
    method: str
    steps: int
    train_loss: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    tokens_per_second: float
    peak_memory_bytes: int
    seconds: float
    train_seconds: float
    train_tokens: int
    trainable_parameters: int
    total_parameters: int
    train_examples: int
    eval_examples: int
    settings: dict[str, Any]
    stopped_early: bool = False
    reward_accuracy: float | None = None
    reward_margin: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the output folder as a string, everything else as is."""
        values = asdict(self)
        values["output_dir"] = str(self.output_dir)
        return values


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | torch.Tensor):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class ReporterCallback(TrainerCallback):
    """Forwards a trainer's logs to a :class:`Reporter` and stops it when the reporter says the
    work was cancelled (the caller raises :class:`Cancelled` once the trainer returns).

    Each logged step becomes ``reporter.metrics(step, {...})`` with the trainer's values
    (``loss``, ``learning_rate``, ``grad_norm``, ``epoch``, ``eval_loss``, DPO rewards...) and
    ``tokens_per_second``: non-padding training tokens per second of step time since the
    previous log.
    """

    def __init__(self, reporter: Reporter, memory: PeakMemory | None = None) -> None:
        self.reporter = reporter
        self.memory = memory
        self.cancelled = False
        self.train_seconds = 0.0
        self.last_eval_step: int | None = None
        self.last_eval: dict[str, float] = {}
        self._step_started: float | None = None
        self._logged_tokens = 0
        self._logged_seconds = 0.0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.reporter.log(f"training {state.max_steps} steps")

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._step_started = time.perf_counter()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._step_started is not None:
            self.train_seconds += time.perf_counter() - self._step_started
            self._step_started = None
        if self.memory is not None:
            self.memory.sample()
        total = max(state.max_steps, 1)
        self.reporter.progress(
            min(state.global_step / total, 1.0), f"step {state.global_step}/{total}"
        )
        if self.reporter.cancelled():
            self.cancelled = True
            control.should_training_stop = True
            self.reporter.log(f"cancelled: stopping after step {state.global_step}")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        values: dict[str, float] = {}
        for key, raw in (logs or {}).items():
            number = _number(raw)
            if number is not None and not key.endswith(_NOISE_SUFFIXES):
                values[key] = number
        if "loss" in values:
            tokens = state.num_input_tokens_seen - self._logged_tokens
            seconds = self.train_seconds - self._logged_seconds
            if tokens > 0 and seconds > 0:
                values["tokens_per_second"] = tokens / seconds
            self._logged_tokens = state.num_input_tokens_seen
            self._logged_seconds = self.train_seconds
        if any(key.startswith("eval_") for key in values):
            self.last_eval_step = state.global_step
            self.last_eval = dict(values)
        if not values:
            return
        self.reporter.metrics(state.global_step, values)
        shown = ", ".join(
            f"{key} {values[key]:.4g}"
            for key in ("loss", "eval_loss", "learning_rate", "tokens_per_second", "train_loss")
            if key in values
        )
        if shown:
            self.reporter.log(f"step {state.global_step}: {shown}")


def _device() -> torch.device:
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def _use_bf16(settings: TrainSettings, device: torch.device) -> bool:
    if settings.precision != "auto":
        return settings.precision == "bfloat16"
    from flywheel.providers.local_model import resolve_dtype

    return resolve_dtype("auto", device) == torch.bfloat16


def load_base_for_training(base_dir: Path, settings: TrainSettings) -> Any:
    """The base model as training needs it: float32 weights (mixed precision autocasts), or a
    bitsandbytes 4-bit NF4 base with double quantization prepared for k-bit training."""
    from transformers import AutoModelForCausalLM

    device = _device()
    if settings.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(
            str(base_dir),
            quantization_config=nf4_config(torch.bfloat16 if _use_bf16(settings, device) else None),
            device_map={"": str(device)},
            dtype=torch.float32,
            local_files_only=True,
        )
        # bitsandbytes 0.50 repacks a 4-bit weight into its CPU inference layout the first time
        # the layer runs in eval mode without gradients (the before-training evaluation), and
        # from then on its matmul has no backward: gradients stop flowing through every frozen
        # layer and only the last layers' adapters learn. Training never wants that layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
    full: Any = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, local_files_only=True
    )
    return full.to(device)


def nf4_config(compute_dtype: torch.dtype | None = None) -> Any:
    """bitsandbytes 4-bit NF4 with double quantization (the QLoRA recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
    )


def lora_config(settings: TrainSettings) -> Any:
    from peft import LoraConfig

    lora = settings.lora
    targets = lora.target_modules
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _trainer_arguments(
    settings: TrainSettings, output_dir: Path, has_eval: bool, device: torch.device
) -> dict[str, Any]:
    """The TrainingArguments shared by SFT and DPO."""
    evaluate_during = has_eval and settings.eval_steps is not None
    arguments: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": settings.batch_size,
        "per_device_eval_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation,
        "learning_rate": settings.learning_rate,
        "num_train_epochs": settings.epochs,
        "max_steps": settings.max_steps if settings.max_steps is not None else -1,
        "warmup_steps": settings.warmup_ratio,  # a float below 1 is a ratio of the steps
        "lr_scheduler_type": settings.lr_scheduler,
        "weight_decay": settings.weight_decay,
        "seed": settings.seed,
        "logging_steps": settings.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "steps" if evaluate_during else "no",
        "eval_steps": settings.eval_steps if evaluate_during else None,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": _use_bf16(settings, device),
        "gradient_checkpointing": settings.gradient_checkpointing,
        "use_cpu": device.type == "cpu",
        "max_length": settings.max_length,
        "include_num_input_tokens_seen": "non_padding",
        "train_sampling_strategy": "group_by_length" if settings.group_by_length else "random",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "remove_unused_columns": True,
    }
    if settings.early_stopping_patience is not None:
        arguments["metric_for_best_model"] = "eval_loss"
        arguments["greater_is_better"] = False
        arguments["load_best_model_at_end"] = False
    return arguments


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No per-map progress bars from datasets while preparing (they flood job logs)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _prompt_completion(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conversational records as prompt/completion, so the loss covers the final assistant
    answer only (TRL's completion-only loss) rather than the prompt and system text."""
    from flywheel.tuning.data import TuningDataError

    converted = []
    for index, record in enumerate(records):
        messages = record.get("messages")
        if not isinstance(messages, list) or len(messages) < 2:
            raise TuningDataError(
                f"record {index}: needs a prompt and an answer (use flywheel.tuning.data."
                "sft_records)"
            )
        if messages[-1].get("role") != "assistant":
            raise TuningDataError(f"record {index}.messages: must end with the assistant answer")
        converted.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return converted


def _write_info(output_dir: Path, base_dir: Path, method: str, settings: TrainSettings) -> None:
    info = {
        "method": method,
        "base": str(base_dir),
        "quantization": settings.quantization,
        "settings": settings.model_dump(),
    }
    (output_dir / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")


def read_training_info(adapter_dir: Path) -> dict[str, Any]:
    """How an adapter was trained (empty for adapters trained elsewhere)."""
    path = Path(adapter_dir) / TRAINING_INFO_FILE
    if not path.is_file():
        return {}
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def _run(
    method: Literal["sft", "dpo"],
    base_dir: Path,
    train: Sequence[dict[str, Any]],
    eval: Sequence[dict[str, Any]],
    settings: TrainSettings,
    output_dir: Path,
    reporter: Reporter,
    callbacks: Sequence[TrainerCallback],
) -> TrainResult:
    from transformers import EarlyStoppingCallback, PrinterCallback

    if not train:
        raise ValueError("no training records")
    if settings.early_stopping_patience is not None and not eval:
        raise ValueError("early_stopping_patience needs held-out records to evaluate")
    if reporter.cancelled():
        raise Cancelled("cancelled before training started")
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = _device()
    with torch_threads(settings.threads), PeakMemory() as memory, _quiet_datasets():
        reporter.log(
            f"loading {base_dir.name}"
            + (" in 4-bit NF4 (QLoRA)" if settings.quantization == "nf4" else "")
        )
        reporter.progress(0.0, "loading the base model")
        model = load_base_for_training(base_dir, settings)
        tokenizer = _tokenizer(base_dir)
        forwarder = ReporterCallback(reporter, memory)
        extra: list[TrainerCallback] = [forwarder, *callbacks]
        if settings.early_stopping_patience is not None:
            extra.append(EarlyStoppingCallback(settings.early_stopping_patience))
        arguments = _trainer_arguments(settings, output_dir, bool(eval), device)
        trainer = (
            _sft_trainer(model, tokenizer, train, eval, settings, arguments, extra)
            if method == "sft"
            else _dpo_trainer(model, tokenizer, train, eval, settings, arguments, extra)
        )
        trainer.remove_callback(PrinterCallback)  # the reporter gets the logs, not stdout
        peft_model = trainer.model
        trainable, total = peft_model.get_nb_trainable_parameters()
        reporter.log(
            f"{len(train)} training / {len(eval)} held-out examples; "
            f"{trainable:,} of {total:,} parameters trainable"
        )
        before: dict[str, float] = {}
        if eval:
            reporter.progress(0.0, "measuring the held-out loss before training")
            before = _evaluate(trainer)
        outcome = trainer.train()
        if forwarder.cancelled:
            raise Cancelled(f"cancelled after step {trainer.state.global_step}")
        after: dict[str, float] = {}
        if eval:
            if forwarder.last_eval_step == trainer.state.global_step and forwarder.last_eval:
                after = dict(forwarder.last_eval)
            else:
                after = _evaluate(trainer)
        trainer.save_model(str(output_dir))
        (output_dir / "training_args.bin").unlink(missing_ok=True)
        _write_info(output_dir, base_dir, method, settings)
        memory.sample()
    state = trainer.state
    tokens = int(state.num_input_tokens_seen)
    result = TrainResult(
        output_dir=output_dir,
        method=method,
        steps=state.global_step,
        train_loss=_number(outcome.training_loss),
        eval_loss_before=before.get("eval_loss"),
        eval_loss_after=after.get("eval_loss"),
        tokens_per_second=tokens / forwarder.train_seconds if forwarder.train_seconds else 0.0,
        peak_memory_bytes=memory.peak_bytes,
        seconds=time.perf_counter() - started,
        train_seconds=forwarder.train_seconds,
        train_tokens=tokens,
        trainable_parameters=int(trainable),
        total_parameters=int(total),
        train_examples=len(train),
        eval_examples=len(eval),
        settings=settings.model_dump(),
        stopped_early=state.global_step < state.max_steps,
        reward_accuracy=after.get("eval_rewards/accuracies"),
        reward_margin=after.get("eval_rewards/margins"),
        metrics=after,
    )
    reporter.progress(1.0, "adapter saved")
    reporter.log(
        f"saved the adapter to {output_dir} after {result.steps} steps "
        f"({result.train_seconds:.1f}s, {result.tokens_per_second:.0f} tokens/s)"
        + (
            f"; held-out loss {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}"
            if result.eval_loss_before is not None and result.eval_loss_after is not None
            else ""
        )
    )
    return result


def _tokenizer(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _evaluate(trainer: Any) -> dict[str, float]:
    metrics = trainer.evaluate()
    return {
        key: number
        for key, number in ((k, _number(v)) for k, v in metrics.items())
        if number is not None and not key.endswith(_NOISE_SUFFIXES)
    }


def _sft_trainer(
    model: Any,
    tokenizer: Any,
    train: Sequence[dict[str, Any]],
    eval: Sequence[dict[str, Any]],
    settings: TrainSettings,
    arguments: dict[str, Any],
    callbacks: list[TrainerCallback],
) -> Any:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer(
        model=model,
        args=SFTConfig(**arguments),
        train_dataset=Dataset.from_list(_prompt_completion(train)),
        eval_dataset=Dataset.from_list(_prompt_completion(eval)) if eval else None,
        processing_class=tokenizer,
        peft_config=lora_config(settings),
        callbacks=callbacks,
    )


def _dpo_trainer(
    model: Any,
    tokenizer: Any,
    train: Sequence[dict[str, Any]],
    eval: Sequence[dict[str, Any]],
    settings: TrainSettings,
    arguments: dict[str, Any],
    callbacks: list[TrainerCallback],
) -> Any:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not isinstance(settings, DpoSettings):
        raise TypeError("DPO needs DpoSettings")
    # transformers' length grouping reads an input_ids column; DPO records hold three
    # (prompt_ids, chosen_ids, rejected_ids), so pairs are shuffled as they are.
    arguments["train_sampling_strategy"] = "random"
    trainer: Any = DPOTrainer(
        model=model,
        ref_model=None,  # with a LoRA adapter the reference is the base, adapter disabled
        args=DPOConfig(
            **arguments,
            beta=settings.beta,
            loss_type=[settings.loss_type],
        ),
        train_dataset=Dataset.from_list(list(train)),
        eval_dataset=Dataset.from_list(list(eval)) if eval else None,
        processing_class=tokenizer,
        peft_config=lora_config(settings),
        callbacks=callbacks,
    )
    if settings.max_prompt_length is not None:
        keep = settings.max_prompt_length

        def cut(example: dict[str, Any]) -> dict[str, Any]:
            return {"prompt_ids": example["prompt_ids"][-keep:]}

        trainer.train_dataset = trainer.train_dataset.map(cut)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = trainer.eval_dataset.map(cut)
    return trainer


def train_sft(
    base_dir: Path,
    train: Sequence[dict[str, Any]],
    eval: Sequence[dict[str, Any]],
    settings: TrainSettings,
    output_dir: Path,
    reporter: Reporter,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Supervised fine-tuning of a LoRA adapter (QLoRA with ``settings.quantization="nf4"``).

    ``train``/``eval`` are conversational records from :func:`~flywheel.tuning.data.
    sft_records`; the loss covers each record's final assistant answer. ``output_dir`` gets the
    PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``), the tokenizer and
    ``flywheel_training.json``. Raises :class:`Cancelled` when the reporter cancels.
    """
    return _run("sft", Path(base_dir), train, eval, settings, output_dir, reporter, callbacks)


def train_dpo(
    base_dir: Path,
    train_pairs: Sequence[dict[str, Any]],
    eval_pairs: Sequence[dict[str, Any]],
    settings: DpoSettings,
    output_dir: Path,
    reporter: Reporter,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Direct preference optimisation of a LoRA adapter on records from
    :func:`~flywheel.tuning.data.dpo_records`. The reference model is the base with the adapter
    disabled (no second copy). ``eval_loss_*`` is the DPO loss on the held-out pairs, and the
    result carries the held-out reward accuracy and margin."""
    if not isinstance(settings, DpoSettings):
        raise TypeError("train_dpo needs DpoSettings")
    return _run(
        "dpo", Path(base_dir), train_pairs, eval_pairs, settings, output_dir, reporter, callbacks
    )
