"""The tuning and optimisation job kinds: ``tune.sft``, ``tune.dpo``, ``tune.sweep``,
``merge``, ``quantize``, ``prune`` and ``distill``.

Each kind validates its params at submission, runs in a job worker, tracks a run (params, step
metrics, system info, artifacts), and registers what it made as a model version whose lineage
points back at the dataset version, the run and the job.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flywheel.config import get_settings
from flywheel.errors import ServiceError
from flywheel.jobs.context import JobContext
from flywheel.jobs.kinds import JobKind, register_job_kind
from flywheel.tuning.runs import RunTracker, TrackedReporter

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
DATASET_REF = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[0-9]+)?$"


class TuningServices(Protocol):
    """What tuning jobs use of the service layer (the worker builds it on first use)."""

    db: Any
    datasets: Any
    registry: Any
    runs: RunTracker
    settings: Any
    config: Any
    writer: Any

    async def eval_call(
        self, project_id: str, body: dict[str, Any], attributes: dict[str, Any]
    ) -> tuple[dict[str, Any], Any]: ...


class _Params(BaseModel):
    # ``register`` is a param name but also ABCMeta.register: the field takes an alias.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    timeout: float | None = Field(default=None, gt=0, description="Seconds before it stops.")


class TrainJobParams(_Params):
    base: str = Field(
        default="builtin:smollm2",
        min_length=1,
        max_length=300,
        description="Registry ref (NAME@VERSION or NAME@ALIAS), catalog model or builtin:.",
    )
    dataset: str = Field(pattern=DATASET_REF, description="NAME@VERSION (or NAME: newest).")
    settings: dict[str, Any] = Field(default_factory=dict)
    register_as: str | None = Field(
        default=None,
        alias="register",
        pattern=NAME_PATTERN,
        description="Register the result as this model.",
    )
    experiment: str = Field(default="", max_length=200)
    num_workers: int = Field(default=1, ge=1, le=64, description="Ray Train workers.")

    @field_validator("num_workers")
    @classmethod
    def _needs_ray(cls, value: int) -> int:
        # Refused at submission rather than failing minutes later in the worker.
        if value > 1 and not get_settings().ray_address:
            raise ValueError(
                "more than one worker trains through Ray Train: set FLYWHEEL_RAY_ADDRESS to "
                "a Ray cluster (and FLYWHEEL_JOB_EXECUTOR=ray to run the job there too)"
            )
        return value


class SweepJobParams(TrainJobParams):
    space: dict[str, Any] = Field(min_length=1)
    strategy: Literal["grid", "random"] = "grid"
    max_trials: int = Field(default=8, ge=1, le=100)
    seed: int = 0


class ModelStepParams(_Params):
    model: str = Field(min_length=1, max_length=300, description="Registry ref NAME@VERSION.")
    register_as: str | None = Field(default=None, alias="register", pattern=NAME_PATTERN)
    eval_dataset: str | None = Field(
        default=None, pattern=DATASET_REF, description="Held-out set for before/after loss."
    )


class MergeJobParams(ModelStepParams):
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class QuantizeJobParams(ModelStepParams):
    method: Literal["bnb-int8", "bnb-nf4", "torchao-int8", "gptq", "gguf"]


class PruneJobParams(ModelStepParams):
    method: Literal["magnitude", "2:4"] = "magnitude"
    amount: float = Field(default=0.5, gt=0, lt=1)


class DistillJobParams(_Params):
    teacher: str = Field(min_length=1, max_length=200, description="Teacher route or model.")
    prompts: str = Field(pattern=DATASET_REF, description="Dataset of prompts (messages).")
    student: str = Field(default="builtin:smollm2", min_length=1, max_length=300)
    dataset: str = Field(pattern=NAME_PATTERN, description="Dataset to write the answers to.")
    settings: dict[str, Any] = Field(default_factory=dict)
    register_as: str | None = Field(default=None, alias="register", pattern=NAME_PATTERN)
    max_tokens: int = Field(default=256, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0, le=2)

    @field_validator("teacher")
    @classmethod
    def _no_self(cls, value: str) -> str:
        if value.startswith(("rag:", "pipeline:")):
            raise ValueError("the teacher is a chat route or model, not rag: or pipeline:")
        return value


def _parse(model: type[BaseModel], values: dict[str, Any], prefix: str) -> dict[str, Any]:
    try:
        return model.model_validate(values).model_dump(by_alias=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join([prefix, *(str(part) for part in first["loc"])])
        raise ServiceError(400, f"{where}: {first['msg']}", "invalid_value", where) from None


def _settings_class(kind: str) -> type[BaseModel]:
    from flywheel.tuning.config import DpoSettings, TrainSettings

    return DpoSettings if kind == "dpo" else TrainSettings


def _settings(kind: str, values: dict[str, Any]) -> Any:
    return _settings_class(kind).model_validate(values)


def _validator(model: type[_Params], settings_kind: str | None = None) -> Any:
    def validate(params: dict[str, Any]) -> dict[str, Any]:
        data = _parse(model, params, "params")
        if settings_kind is not None:
            data["settings"] = _parse(
                _settings_class(settings_kind), data.get("settings") or {}, "params.settings"
            )
        return data

    return validate


# -- shared steps --------------------------------------------------------------------------


def _split_ref(ref: str) -> tuple[str, int | None]:
    name, _, version = ref.partition("@")
    return name, int(version) if version else None


def _dataset_items(
    svc: TuningServices, project_id: str, ref: str
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """A dataset version's train and test items, and its exact ``name@version``."""
    name, version = _split_ref(ref)
    described, items = svc.datasets.items(project_id, name, version)
    exact = f"{described['dataset']}@{described['version']}"
    shaped = [
        {"messages": i["messages"], "expected": i["expected"], "meta": i["metadata"] or {}}
        for i in items
    ]
    train = [s for s, i in zip(shaped, items, strict=True) if i["split"] == "train"]
    test = [s for s, i in zip(shaped, items, strict=True) if i["split"] == "test"]
    return exact, train, test


def resolve_model_dir(svc: TuningServices, project_id: str, ref: str) -> tuple[Path, str | None]:
    """A local HF folder for a base model, and its registry version id when it has one.

    ``ref`` is a registry ref (``NAME@VERSION``, ``NAME@ALIAS``), a catalog model's name, or a
    ``builtin:`` model; the last two are converted once into the model cache."""
    from flywheel.providers.local_model import materialize_model

    cache = svc.settings.resolved_model_cache
    if ref.startswith("builtin:"):
        return materialize_model(ref, cache), None
    catalog = {model.name: model for model in svc.config.models}
    if ref in catalog and "@" not in ref:
        source = catalog[ref].source
        if not source:
            raise ServiceError(
                400, f"Catalog model '{ref}' is not a local model.", "invalid_value", "base"
            )
        return materialize_model(source, cache), None
    version = svc.registry.resolve(project_id, ref)
    return svc.registry.local_path(project_id, ref), version["id"]


def _register(
    svc: TuningServices,
    ctx: JobContext,
    name: str,
    folder: Path,
    *,
    kind: str,
    format: str,
    parent: str | None,
    run_id: str,
    datasets: list[str],
    params: dict[str, Any],
    metrics: dict[str, Any],
    description: str,
) -> dict[str, Any]:
    version: dict[str, Any] = svc.registry.register_version(
        ctx.project_id,
        name,
        kind=kind,
        source=folder,
        format=format,
        actor=ctx.actor,
        author_id=ctx.author_id,
        parent=parent,
        run_id=run_id,
        job_id=ctx.job_id,
        datasets=datasets,
        params=params,
        metrics=metrics,
        description=description,
    )
    ctx.log(f"registered {name}@{version['version']} ({kind}, {version['size_bytes']} bytes)")
    svc.runs.add_artifact(
        run_id, f"{name}@{version['version']}", version["uri"], version["size_bytes"]
    )
    return version


def _parent_ref(svc: TuningServices, project_id: str, base: str) -> str | None:
    if base.startswith("builtin:") or base in {m.name for m in svc.config.models}:
        return None
    version = svc.registry.resolve(project_id, base)
    return str(version["ref"])


def _track(
    ctx: JobContext,
    svc: TuningServices,
    name: str,
    kind: str,
    params: dict[str, Any],
    inputs: list[str],
    experiment: str = "",
) -> tuple[str, TrackedReporter]:
    run_id = svc.runs.start(
        ctx.project_id,
        name,
        kind,
        params,
        ctx.actor,
        job_id=ctx.job_id,
        experiment=experiment or ctx.params.get("experiment", ""),
        inputs=inputs,
    )
    ctx.log(f"tracking run {run_id}")
    return run_id, TrackedReporter(ctx, svc.runs, run_id)


def _finish_run(svc: TuningServices, run_id: str, ctx: JobContext, summary: dict[str, Any]) -> None:
    svc.runs.finish(run_id, "cancelled" if ctx.cancelled() else "finished", summary)


def _guard_run(svc: TuningServices, run_id: str, ctx: JobContext, exc: BaseException) -> None:
    svc.runs.finish(run_id, "cancelled" if ctx.cancelled() else "failed", {"error": str(exc)})


# -- kinds ---------------------------------------------------------------------------------


def _train(ctx: JobContext, method: Literal["sft", "dpo"]) -> dict[str, Any]:
    from flywheel.tuning.data import dpo_records, sft_records, split_records
    from flywheel.tuning.train import train_dpo, train_sft

    svc: TuningServices = ctx.services()
    params = ctx.params
    settings = _settings(method, params["settings"])
    dataset, train_items, test_items = _dataset_items(svc, ctx.project_id, params["dataset"])
    convert = sft_records if method == "sft" else dpo_records
    train, held_out = convert(train_items), convert(test_items)
    if not held_out:
        train, held_out = split_records(train, settings.eval_fraction, settings.seed)
    ctx.log(f"{dataset}: {len(train)} training and {len(held_out)} held-out examples")
    base_dir, _ = resolve_model_dir(svc, ctx.project_id, params["base"])
    parent = _parent_ref(svc, ctx.project_id, params["base"])
    run_params = {
        "method": method,
        "base": params["base"],
        "dataset": dataset,
        **settings.model_dump(),
    }
    run_id, reporter = _track(
        ctx,
        svc,
        f"{method} {dataset}",
        f"tune.{method}",
        run_params,
        [dataset, *([parent] if parent else [])],
    )
    try:
        output = ctx.workdir / "adapter"
        if params.get("num_workers", 1) > 1:
            from flywheel.jobs.ray_executor import train_distributed

            result = train_distributed(
                method, base_dir, train, held_out, settings, output, reporter, params["num_workers"]
            )
        elif method == "sft":
            result = train_sft(base_dir, train, held_out, settings, output, reporter)
        else:
            result = train_dpo(base_dir, train, held_out, settings, output, reporter)
    except BaseException as exc:
        _guard_run(svc, run_id, ctx, exc)
        raise
    summary = result.to_dict()
    summary.pop("output_dir", None)
    _finish_run(svc, run_id, ctx, summary)
    outcome: dict[str, Any] = {"run_id": run_id, "dataset": dataset, **summary}
    if ctx.cancelled():
        return outcome
    name = params.get("register") or f"{dataset.split('@')[0]}-{method}"
    if parent is None:
        parent = _ensure_base(svc, ctx, params["base"], base_dir)
    version = _register(
        svc,
        ctx,
        name,
        output,
        kind="adapter",
        format="peft",
        parent=parent,
        run_id=run_id,
        datasets=[dataset],
        params=run_params,
        metrics={k: v for k, v in summary.items() if isinstance(v, int | float)},
        description=f"LoRA {method.upper()} adapter trained on {dataset}",
    )
    outcome["model"] = f"{name}@{version['version']}"
    return outcome


def _ensure_base(svc: TuningServices, ctx: JobContext, base: str, folder: Path) -> str:
    """The registry version of a catalog or builtin base, registered once (lineage needs
    every adapter's base in the registry)."""
    name = base.removeprefix("builtin:").replace(":", "-").replace("/", "-")[:120]
    try:
        model = svc.registry.get_model(ctx.project_id, name)
        for version in model.get("versions", []):
            if version.get("kind") == "base":
                return f"{name}@{version['version']}"
    except ServiceError:
        pass
    found = svc.registry.register_version(
        ctx.project_id,
        name,
        kind="base",
        source=folder,
        format="safetensors",
        actor=ctx.actor,
        author_id=ctx.author_id,
        description=f"Base model {base}",
        params={"source": base},
    )
    return f"{name}@{found['version']}"


def _sweep(ctx: JobContext) -> dict[str, Any]:
    from flywheel.tuning.data import sft_records, split_records
    from flywheel.tuning.sweep import MedianStopper, apply_overrides, best_trial, sweep_trials
    from flywheel.tuning.train import train_sft

    svc: TuningServices = ctx.services()
    params = ctx.params
    base_settings = _settings("sft", params["settings"])
    dataset, train_items, test_items = _dataset_items(svc, ctx.project_id, params["dataset"])
    train, held_out = sft_records(train_items), sft_records(test_items)
    if not held_out:
        train, held_out = split_records(train, base_settings.eval_fraction, base_settings.seed)
    base_dir, _ = resolve_model_dir(svc, ctx.project_id, params["base"])
    trials = sweep_trials(params["space"], params["strategy"], params["max_trials"], params["seed"])
    # Early stopping across trials: a trial worse than the finished ones' median stops.
    stopper = MedianStopper(min_trials=1, grace_steps=1)
    experiment = params.get("experiment") or f"sweep-{ctx.job_id[:8]}"
    results: list[dict[str, Any]] = []
    for index, overrides in enumerate(trials):
        if ctx.cancelled():
            break
        settings = apply_overrides(base_settings, overrides)
        ctx.log(f"trial {index + 1}/{len(trials)}: {json.dumps(overrides)}")
        run_id, reporter = _track(
            ctx,
            svc,
            f"trial {index + 1}",
            "tune.sft",
            {"trial": index, "overrides": overrides, **settings.model_dump()},
            [dataset],
            experiment,
        )
        try:
            result = train_sft(
                base_dir,
                train,
                held_out,
                settings,
                ctx.workdir / f"trial-{index}",
                reporter,
                callbacks=[stopper],
            )
        except BaseException as exc:
            _guard_run(svc, run_id, ctx, exc)
            raise
        summary = result.to_dict()
        summary.pop("output_dir", None)
        _finish_run(svc, run_id, ctx, summary)
        results.append({"trial": index, "run_id": run_id, "overrides": overrides, **summary})
        ctx.progress((index + 1) / len(trials), f"trial {index + 1} of {len(trials)}")
    best = best_trial(results, metric="eval_loss_after") if results else None
    return {"experiment": experiment, "trials": results, "best": best}


def _model_step(ctx: JobContext, step: str) -> dict[str, Any]:
    from flywheel.tuning.data import sft_records

    svc: TuningServices = ctx.services()
    params = ctx.params
    version = svc.registry.resolve(ctx.project_id, params["model"])
    ref = version["ref"]
    source = svc.registry.local_path(ctx.project_id, ref)
    eval_records = None
    inputs = [ref]
    if params.get("eval_dataset"):
        exact, _, test = _dataset_items(svc, ctx.project_id, params["eval_dataset"])
        eval_records = sft_records(test)[:64]
        inputs.append(exact)
    run_params = {k: v for k, v in params.items() if k != "timeout"}
    run_id, reporter = _track(ctx, svc, f"{step} {ref}", step, run_params, inputs)
    output = ctx.workdir / step
    try:
        if step == "merge":
            from flywheel.tuning.merge import merge_adapter

            if version["kind"] != "adapter" or not version.get("parent"):
                raise ServiceError(
                    400,
                    f"{ref} is not an adapter with a base to merge onto.",
                    "invalid_value",
                    "model",
                )
            base = svc.registry.local_path(ctx.project_id, version["parent"])
            result = merge_adapter(
                base, source, output, reporter, dtype=params["dtype"], eval_records=eval_records
            )
            kind, fmt = "merged", "safetensors"
        elif step == "quantize":
            from flywheel.tuning.quantize import quantize_model

            result = quantize_model(
                source, output, params["method"], reporter, eval_records=eval_records
            )
            kind, fmt = "quantized", params["method"]
        else:
            from flywheel.tuning.prune import prune_model

            result = prune_model(
                source,
                output,
                params["method"],
                params["amount"],
                reporter,
                eval_records=eval_records,
            )
            kind, fmt = "pruned", "safetensors"
    except BaseException as exc:
        _guard_run(svc, run_id, ctx, exc)
        raise
    summary = {k: v for k, v in result.items() if k != "output_dir"}
    _finish_run(svc, run_id, ctx, summary)
    name = params.get("register") or version["name"]
    made = _register(
        svc,
        ctx,
        name,
        output,
        kind=kind,
        format=fmt,
        parent=ref,
        run_id=run_id,
        datasets=list(version.get("datasets") or []),
        params=run_params,
        metrics=_flat_numbers(summary),
        description=f"{step} of {ref}",
    )
    return {"run_id": run_id, "model": f"{name}@{made['version']}", **summary}


def _flat_numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _distill(ctx: JobContext) -> dict[str, Any]:
    """Answer a prompt dataset with the teacher (through the gateway, traced and budgeted),
    save the answers as a dataset version, then SFT the student on it."""
    svc: TuningServices = ctx.services()
    params = ctx.params
    name, version = _split_ref(params["prompts"])
    described, items = svc.datasets.items(ctx.project_id, name, version)
    answered: list[dict[str, Any]] = []

    async def answer_all() -> None:
        for index, item in enumerate(items):
            if ctx.cancelled():
                return
            messages = [m for m in item["messages"] or [] if m.get("role") != "assistant"]
            if not messages:
                continue
            body = {
                "model": params["teacher"],
                "messages": messages,
                "max_tokens": params["max_tokens"],
                "temperature": params["temperature"],
            }
            response, _ = await svc.eval_call(ctx.project_id, body, {"flywheel.job": ctx.job_id})
            text = response["choices"][0]["message"].get("content") or ""
            answered.append(
                {"messages": messages, "expected": text, "metadata": {"teacher": params["teacher"]}}
            )
            ctx.progress(0.5 * (index + 1) / len(items), f"teacher answered {index + 1}")
        # The teacher's calls are traced like any other; they must land before we go on.
        await asyncio.to_thread(svc.writer.flush)

    asyncio.run(answer_all())
    if ctx.cancelled():
        return {"answered": len(answered)}
    created, _ = svc.datasets.create_version(
        ctx.project_id,
        params["dataset"],
        answered,
        author=ctx.actor,
        message=f"distilled from {params['teacher']} on "
        f"{described['dataset']}@{described['version']}",
        source={"kind": "distill", "teacher": params["teacher"], "job": ctx.job_id},
    )
    ref = f"{params['dataset']}@{created['version']}"
    ctx.log(f"teacher answers saved as {ref}")
    ctx.params = {
        "base": params["student"],
        "dataset": ref,
        "settings": params["settings"],
        "register": params.get("register"),
        "experiment": "",
        "num_workers": 1,
    }
    return {"dataset": ref, **_train(ctx, "sft")}


def register_kinds() -> None:
    """Make the tuning kinds available (imported by the job registry on first use)."""
    kinds = [
        JobKind(
            "tune.sft",
            lambda ctx: _train(ctx, "sft"),
            _validator(TrainJobParams, "sft"),
            "LoRA/QLoRA supervised fine-tuning on a dataset version (TRL + PEFT).",
        ),
        JobKind(
            "tune.dpo",
            lambda ctx: _train(ctx, "dpo"),
            _validator(TrainJobParams, "dpo"),
            "DPO from preference pairs (expected = chosen, metadata.rejected).",
        ),
        JobKind(
            "tune.sweep",
            _sweep,
            _validator(SweepJobParams, "sft"),
            "A grid or random hyperparameter sweep of SFT with early stopping.",
        ),
        JobKind(
            "merge",
            lambda ctx: _model_step(ctx, "merge"),
            _validator(MergeJobParams),
            "Merge a LoRA adapter onto its dequantized base.",
        ),
        JobKind(
            "quantize",
            lambda ctx: _model_step(ctx, "quantize"),
            _validator(QuantizeJobParams),
            "Quantize a model: bitsandbytes int8/NF4, torchao int8, GPTQ, GGUF.",
        ),
        JobKind(
            "prune",
            lambda ctx: _model_step(ctx, "prune"),
            _validator(PruneJobParams),
            "Magnitude pruning (unstructured or 2:4), measured before and after.",
        ),
        JobKind(
            "distill",
            _distill,
            _validator(DistillJobParams, "sft"),
            "Answer prompts with a teacher route, then SFT a student on the answers.",
        ),
    ]
    for kind in kinds:
        register_job_kind(kind)


register_kinds()
