"""Validated settings for LoRA/QLoRA fine-tuning (SFT and DPO).

Every model forbids unknown fields, so a misspelt setting fails with a message that names it
instead of being silently ignored.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The attention projections of llama-style models (SmolLM2, Llama, Mistral, Qwen...).
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")


class LoraSettings(BaseModel):
    """The LoRA adapter: which linear layers get low-rank updates, and how big they are."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=8, ge=1, le=1024, description="Rank r of the update matrices.")
    alpha: int = Field(
        default=16, ge=1, le=8192, description="Scaling numerator: updates are scaled by alpha/r."
    )
    dropout: float = Field(
        default=0.05, ge=0, lt=1, description="Dropout on the adapter's input while training."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(LLAMA_ATTENTION),
        description="Module names to adapt (default: the llama attention projections "
        "q/k/v/o), or 'all-linear' for every linear layer except the output head.",
    )

    @field_validator("target_modules")
    @classmethod
    def _known_shape(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            return value
        if not value:
            raise ValueError("name at least one module, or use 'all-linear'")
        for name in value:
            if not _MODULE_NAME.match(name):
                raise ValueError(f"{name!r} is not a module name")
        return value


class TrainSettings(BaseModel):
    """Supervised fine-tuning of a LoRA adapter (optionally on a 4-bit NF4 base: QLoRA)."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak AdamW learning rate.")
    epochs: float = Field(default=1.0, gt=0, le=100, description="Passes over the training set.")
    max_steps: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Optimizer steps; overrides epochs when set."
    )
    batch_size: int = Field(default=8, ge=1, le=1024, description="Examples per forward pass.")
    gradient_accumulation: int = Field(
        default=1, ge=1, le=1024, description="Forward passes per optimizer step."
    )
    max_length: int = Field(
        default=256, ge=8, le=32768, description="Tokens per example; longer ones are cut."
    )
    warmup_ratio: float = Field(
        default=0.0, ge=0, lt=1, description="Fraction of the steps spent warming the LR up."
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="How the learning rate decays after warmup."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed for the adapter and order.")
    eval_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Share of the training records held out when no eval split is given.",
    )
    eval_steps: int | None = Field(
        default=None, ge=1, description="Evaluate every N steps (None: before and after only)."
    )
    early_stopping_patience: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Stop after this many evaluations without a lower eval_loss (needs "
        "eval_steps).",
    )
    quantization: Literal["none", "nf4"] = Field(
        default="none",
        description="'nf4' loads the base in bitsandbytes 4-bit NF4 with double quantization "
        "(QLoRA); 'none' trains on the full-precision base.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    threads: int | None = Field(
        default=None, ge=1, le=1024, description="CPU threads for torch (None: torch's default)."
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="Compute precision: bfloat16 autocast, float32, or 'auto' (bfloat16 where "
        "the hardware runs it fast: CUDA with bf16, CPUs with AVX512-BF16/AMX).",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: less memory, ~15% slower. "
        "Small models on CPU do not need it.",
    )
    group_by_length: bool = Field(
        default=True,
        description="Batch examples of similar length together, which wastes less compute on "
        "padding (the batches are still shuffled).",
    )
    logging_steps: int = Field(default=1, ge=1, le=10_000, description="Report every N steps.")

    @model_validator(mode="after")
    def _early_stopping_needs_evaluations(self) -> TrainSettings:
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ValueError("early_stopping_patience needs eval_steps (evaluations to compare)")
        return self


class DpoSettings(TrainSettings):
    """Direct preference optimisation of a LoRA adapter; the reference model is the base with
    the adapter disabled, so no second copy of the model is loaded."""

    learning_rate: float = Field(default=5e-5, gt=0, le=1, description="Peak AdamW learning rate.")
    beta: float = Field(
        default=0.1, gt=0, le=10, description="How far the policy may move from the reference."
    )
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "sppo_hard", "apo_zero"] = Field(
        default="sigmoid", description="DPO loss variant (TRL's loss_type)."
    )
    max_prompt_length: int | None = Field(
        default=None,
        ge=1,
        le=32768,
        description="Keep at most this many prompt tokens (the end of the prompt is kept).",
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> DpoSettings:
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self
