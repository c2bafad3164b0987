"""``flywheel kb`` and ``flywheel pipelines`` (through the server's API, with the SDK)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flywheel.cli.common import (
    DEFAULT_URL,
    KeyOption,
    ProjectOption,
    UrlOption,
    _client,
    _fail,
    _fmt,
    _sdk_call,
    console,
)
from flywheel.cli.jobs import follow
from flywheel.rag.loaders import SUPPORTED_SUFFIXES

kb_app = typer.Typer(help="Knowledge bases: create, ingest files and URLs, search, evaluate.")
pipelines_app = typer.Typer(help="Declarative pipelines: save, validate, list and run.")
# Files per upload request: large folders go up in several requests, with progress.
UPLOAD_BATCH_FILES = 20
UPLOAD_BATCH_BYTES = 16 * 1024 * 1024


def _files(paths: list[Path]) -> list[tuple[str, Path]]:
    """(source name, path) of every supported file: a folder's files are named by their path
    inside it, hidden files and folders skipped; a file given directly keeps its name."""
    found: list[tuple[str, Path]] = []
    for path in paths:
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                relative = file.relative_to(path)
                hidden = any(p.startswith(".") for p in relative.parts)
                if file.is_file() and not hidden and file.suffix.lower() in SUPPORTED_SUFFIXES:
                    found.append((relative.as_posix(), file))
        elif path.is_file():
            found.append((path.name, path))
        else:
            raise _fail(f"{path}: no such file or folder")
    return found


def _batches(files: list[tuple[str, Path]]) -> list[list[tuple[str, Path]]]:
    batches: list[list[tuple[str, Path]]] = [[]]
    size = 0
    for source, path in files:
        length = path.stat().st_size
        if batches[-1] and (
            len(batches[-1]) >= UPLOAD_BATCH_FILES or size + length > UPLOAD_BATCH_BYTES
        ):
            batches.append([])
            size = 0
        batches[-1].append((source, path))
        size += length
    return [b for b in batches if b]


def _parse_metadata(metadata: str | None) -> dict[str, Any] | None:
    if metadata is None:
        return None
    try:
        value = json.loads(metadata)
    except ValueError as exc:
        raise _fail(f"--metadata: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _fail("--metadata: must be a JSON object")
    return value


@kb_app.command("create")
def kb_create(
    name: Annotated[str, typer.Argument(help="Knowledge base name.")],
    description: Annotated[str, typer.Option(help="What it holds.")] = "",
    chunk_tokens: Annotated[int | None, typer.Option(help="Tokens per chunk.")] = None,
    overlap_tokens: Annotated[int | None, typer.Option(help="Tokens of overlap.")] = None,
    strategy: Annotated[str | None, typer.Option(help="recursive or markdown.")] = None,
    embedder: Annotated[
        str | None, typer.Option(help="builtin:minilm or a catalog embedding model.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Create an empty knowledge base."""
    chunker = {
        k: v
        for k, v in {
            "chunk_tokens": chunk_tokens,
            "overlap_tokens": overlap_tokens,
            "strategy": strategy,
        }.items()
        if v is not None
    }
    settings: dict[str, Any] = {}
    if chunker:
        settings["chunker"] = chunker
    if embedder:
        settings["embedder"] = embedder
    with _client(url, api_key, project) as client:
        kb = _sdk_call(client.kbs.create, name, description=description, settings=settings or None)
    console.print(f"created knowledge base [bold]{kb['name']}[/bold]")


@kb_app.command("list")
def kb_list(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, project: ProjectOption = None
) -> None:
    """Knowledge bases with their document and chunk counts."""
    with _client(url, api_key, project) as client:
        rows = _sdk_call(client.kbs.list)
    table = Table("name", "documents", "chunks", "index", "embedder", "description")
    for row in rows:
        table.add_row(
            row["name"],
            str(row["document_count"]),
            str(row["chunk_count"]),
            _fmt(row["index_version"]),
            row["settings"]["embedder"],
            row["description"],
        )
    console.print(table)


@kb_app.command("ingest")
def kb_ingest(
    name: Annotated[str, typer.Argument(help="Knowledge base name.")],
    paths: Annotated[
        list[str], typer.Argument(help="Files, folders (recursively) or http(s) URLs.")
    ],
    metadata: Annotated[
        str | None, typer.Option(help='JSON metadata for every document, e.g. {"team": "x"}.')
    ] = None,
    background: Annotated[
        bool,
        typer.Option(
            "--background", help="Ingest in kb.ingest jobs (one per upload batch); print their ids."
        ),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="With --background: follow the jobs.")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Upload files and folders (txt, md, html, pdf, docx, csv, json) or fetch URLs. Only
    changed documents are re-indexed."""
    extra = _parse_metadata(metadata)
    urls = [p for p in paths if p.startswith(("http://", "https://"))]
    files = _files([Path(p) for p in paths if p not in urls])
    if not files and not urls:
        raise _fail("nothing to ingest: no supported files found")
    if background:
        _ingest_in_background(url, api_key, project, name, files, urls, extra, wait=wait)
        return
    totals: dict[str, list[Any]] = {
        k: [] for k in ("added", "updated", "unchanged", "duplicates", "failed")
    }
    version = None
    with (
        _client(url, api_key, project) as client,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        task = progress.add_task(f"ingesting into {name}", total=len(files) + len(urls))
        for batch in _batches(files):
            report = _sdk_call(
                client.kbs.upload,
                name,
                [(source, path.read_bytes()) for source, path in batch],
                metadata=extra,
            )
            for key in totals:
                totals[key] += report[key]
            version = report["index_version"]
            progress.advance(task, len(batch))
        if urls:
            report = _sdk_call(client.kbs.add_urls, name, urls, metadata=extra)
            for key in totals:
                totals[key] += report[key]
            version = report["index_version"]
            progress.advance(task, len(urls))
    console.print(
        f"added {len(totals['added'])}, updated {len(totals['updated'])}, unchanged "
        f"{len(totals['unchanged'])}, duplicates {len(totals['duplicates'])}, failed "
        f"{len(totals['failed'])}; index version {_fmt(version)}"
    )
    for failure in totals["failed"]:
        console.print(f"[red]failed[/red] {failure['source']}: {failure['problem']}")
    for duplicate in totals["duplicates"]:
        console.print(f"duplicate {duplicate['source']} (same text as {duplicate['duplicate_of']})")


def _count(items: list[Any], noun: str) -> str:
    return f"1 {noun}" if len(items) == 1 else f"{len(items)} {noun}s"


def _ingest_in_background(
    url: str,
    api_key: str | None,
    project: str | None,
    name: str,
    files: list[tuple[str, Path]],
    urls: list[str],
    extra: dict[str, Any] | None,
    *,
    wait: bool,
) -> None:
    """Upload each batch (and the URLs) as a kb.ingest job; the server ingests them one
    after another. With ``wait``, follow each job to its end (exit 1 when one failed)."""
    jobs: list[dict[str, Any]] = []
    with _client(url, api_key, project) as client:
        for batch in _batches(files):
            sent = [(source, path.read_bytes()) for source, path in batch]
            jobs.append(_sdk_call(client.kbs.upload, name, sent, metadata=extra, background=True))
            console.print(f"job {jobs[-1]['id']} queued (kb.ingest, {_count(batch, 'file')})")
        if urls:
            jobs.append(_sdk_call(client.kbs.add_urls, name, urls, metadata=extra, background=True))
            console.print(f"job {jobs[-1]['id']} queued (kb.ingest, {_count(urls, 'URL')})")
        if wait:
            for job in jobs:
                follow(client, job, logs=False)


@kb_app.command("search")
def kb_search(
    name: Annotated[str, typer.Argument(help="Knowledge base name.")],
    query: Annotated[str, typer.Argument(help="What to search for.")],
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", help="Hits.")] = None,
    mode: Annotated[str | None, typer.Option(help="dense, bm25 or hybrid.")] = None,
    filters: Annotated[str | None, typer.Option(help='JSON, e.g. {"source": "faq/*"}.')] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Search a knowledge base; shows each hit's dense and BM25 ranks beside the final one."""
    with _client(url, api_key, project) as client:
        found = _sdk_call(
            client.kbs.search,
            name,
            query,
            top_k=top_k,
            mode=mode,
            filters=_parse_metadata(filters) if filters else None,
        )
    if as_json:
        console.print_json(json.dumps(found))
        return
    table = Table("rank", "score", "dense", "bm25", "source", "text")
    for hit in found["hits"]:
        table.add_row(
            str(hit["rank"]),
            f"{hit['score']:.4f}",
            _fmt(hit.get("dense_rank")),
            _fmt(hit.get("bm25_rank")),
            hit["source"],
            " ".join(hit["text"].split())[:120],
        )
    console.print(table)
    console.print(f"{found['mode']} search, index version {_fmt(found['index_version'])}")


def _read_items(path: Path) -> list[dict[str, Any]]:
    """Labelled queries from JSONL (one object per line) or a JSON list; errors name the line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise _fail(f"{path}: {exc.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise _fail(f"{path}: invalid JSON: {exc}") from None
        return list(items)
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except ValueError as exc:
                raise _fail(f"{path}:{number}: invalid JSON: {exc}") from None
    return items


@kb_app.command("eval")
def kb_eval(
    name: Annotated[str, typer.Argument(help="Knowledge base name.")],
    dataset: Annotated[
        str | None, typer.Option(help="Dataset whose items have metadata.relevant.")
    ] = None,
    version: Annotated[int | None, typer.Option(help="Dataset version (default: newest).")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help='JSONL of {"query", "relevant"}.')
    ] = None,
    k: Annotated[list[int] | None, typer.Option("-k", help="Cut-offs (repeat).")] = None,
    mode: Annotated[list[str] | None, typer.Option(help="Modes (repeat); default all.")] = None,
    level: Annotated[str, typer.Option(help="document or chunk.")] = "document",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """hit@k, recall@k, precision@k, MRR and nDCG@k of dense, BM25 and hybrid search."""
    if (dataset is None) == (file is None):
        raise _fail("give either --dataset or --file")
    items = _read_items(file) if file is not None else None
    with _client(url, api_key, project) as client:
        report = _sdk_call(
            client.kbs.evaluate,
            name,
            items=items,
            dataset=dataset,
            version=version,
            modes=mode,
            ks=k,
            level=level,
        )
    if as_json:
        console.print_json(json.dumps({key: v for key, v in report.items() if key != "per_query"}))
        return
    modes = report["modes"]
    metrics = sorted({m for values in modes.values() for m in values}, key=_metric_order)
    table = Table("metric", *modes)
    for metric in metrics:
        table.add_row(metric, *(_fmt(modes[mode_].get(metric)) for mode_ in modes))
    console.print(table)
    console.print(
        f"{report['queries']} queries ({report['skipped']} without labels), "
        f"{report['level']} level, index version {_fmt(report['index_version'])}"
    )


def _metric_order(metric: str) -> tuple[str, int]:
    base, _, k = metric.partition("@")
    return base, int(k) if k.isdigit() else 0


@kb_app.command("show")
def kb_show(
    name: Annotated[str, typer.Argument(help="Knowledge base name.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Settings, counts and index versions."""
    with _client(url, api_key, project) as client:
        kb = _sdk_call(client.kbs.get, name)
        versions = _sdk_call(client.kbs.versions, name)
    console.print(yaml.safe_dump({k: v for k, v in kb.items() if k != "index"}, sort_keys=False))
    table = Table("version", "active", "embedder", "chunks", "documents", "kind")
    for row in versions:
        table.add_row(
            str(row["version"]),
            "*" if row["active"] else "",
            row["embedder"],
            str(row["chunk_count"]),
            str(row["document_count"]),
            row["vector_kind"],
        )
    console.print(table)


@kb_app.command("delete")
def kb_delete(
    name: Annotated[str, typer.Argument(help="Knowledge base name.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Delete a knowledge base with its documents and indexes."""
    if not yes:
        typer.confirm(f"Delete knowledge base '{name}' and all its documents?", abort=True)
    with _client(url, api_key, project) as client:
        _sdk_call(client.kbs.delete, name)
    console.print(f"deleted {name}")


# -- pipelines -------------------------------------------------------------------------------


@pipelines_app.command("list")
def pipelines_list(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, project: ProjectOption = None
) -> None:
    """The project's pipelines."""
    with _client(url, api_key, project) as client:
        rows = _sdk_call(client.pipelines.list)
    table = Table("name", "version", "updated by", "description")
    for row in rows:
        table.add_row(row["name"], str(row["version"]), row["updated_by"], row["description"])
    console.print(table)


def _spec_text(file: Path) -> str:
    try:
        return file.read_text()
    except OSError as exc:
        raise _fail(f"{file}: {exc.strerror}") from None


@pipelines_app.command("put")
def pipelines_put(
    file: Annotated[Path, typer.Argument(help="The pipeline's YAML file.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Create or replace the pipeline the file names."""
    text = _spec_text(file)
    try:
        name = (yaml.safe_load(text) or {}).get("name")
    except yaml.YAMLError as exc:
        raise _fail(f"{file}: invalid YAML: {exc}") from None
    if not isinstance(name, str):
        raise _fail(f"{file}: the pipeline has no name")
    with _client(url, api_key, project) as client:
        saved = _sdk_call(client.pipelines.put, name, text)
    console.print(f"saved pipeline [bold]{saved['name']}[/bold] version {saved['version']}")


@pipelines_app.command("validate")
def pipelines_validate(
    file: Annotated[Path, typer.Argument(help="The pipeline's YAML file.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Check a pipeline file; each problem names the line, step and field."""
    with _client(url, api_key, project) as client:
        answer = _sdk_call(client.pipelines.validate, _spec_text(file))
    if answer["valid"]:
        console.print(f"{file}: valid ({len(answer['steps'])} steps)")
        return
    for problem in answer["problems"]:
        console.print(f"[red]{file}[/red]: {problem.removeprefix('pipeline.yaml')}")
    raise typer.Exit(1)


@pipelines_app.command("run")
def pipelines_run(
    name: Annotated[str, typer.Argument(help="Pipeline name.")],
    inputs: Annotated[
        list[str] | None, typer.Option("--input", "-i", help="NAME=VALUE (VALUE may be JSON).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole run as JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Run a pipeline and print its output (and each step's status)."""
    values: dict[str, Any] = {}
    for pair in inputs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise _fail(f"--input {pair!r}: use NAME=VALUE")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    with _client(url, api_key, project) as client:
        run = _sdk_call(client.pipelines.run, name, values)
    if as_json:
        console.print_json(json.dumps(run))
    else:
        table = Table("step", "type", "status", "ms", "error")
        for step in run["steps"]:
            table.add_row(
                step["id"], step["type"], step["status"], _fmt(step["latency_ms"]), step["error"]
            )
        console.print(table)
        output = run["output"]
        console.print(output if isinstance(output, str) else json.dumps(output, indent=2))
        console.print(f"trace {run['trace_id']}")
    if run["status"] != "ok":
        raise _fail(f"pipeline {name} failed: {run['error']}")
