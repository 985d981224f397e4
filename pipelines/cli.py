"""The ``cssl`` command line.

Every verb has ``--help``. Errors print one line on stderr and exit non-zero; ``--debug`` shows
the traceback. Heavy imports (torch, prefect, mlflow, the benchmarks) happen inside the verbs
that need them, so building the parser, ``--help``, ``config`` and ``validate`` import none of
them (a test checks it).

The verbs that run flows (``refresh``, ``demo``) start Prefect's temporary server once, show
training progress and each gate decision on the console (Prefect's task-state lines stay in
its logs), and stop cleanly on SIGTERM/SIGINT: training stops after its current step (the
rerun resumes from the newest checkpoint), the run is marked FAILED, every process the command
started is stopped, and the exit code is 128 + the signal number (``pipelines/stopping.py``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from cssl_core.config import ConfigError, Params, json_schema, load_params
from cssl_core.data.shard import MANIFEST, Shard
from pipelines import stopping
from pipelines.settings import state_dir

if TYPE_CHECKING:
    from pipelines.progress import TrainStep

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DRIFT = 0, 1, 2, 3


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


def _distributed_overrides(args: argparse.Namespace) -> list[str]:
    """``--nproc-per-node/--nnodes/--rdzv-endpoint`` as ``distributed.*`` overrides."""
    flags = {
        "nproc_per_node": getattr(args, "nproc_per_node", None),
        "nnodes": getattr(args, "nnodes", None),
        "rdzv_endpoint": getattr(args, "rdzv_endpoint", None),
    }
    return [f"distributed.{k}={v}" for k, v in flags.items() if v is not None]


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*(args.set or ()), *_distributed_overrides(args)]


def _params(args: argparse.Namespace) -> Params:
    return load_params(args.params, _overrides(args))


def _progress(total: int | None, description: str) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
    progress.add_task(description, total=total)
    return progress


def _advance(progress: Any) -> Callable[[int], None]:
    task = progress.task_ids[0]
    return lambda n: progress.advance(task, n)


def _emit(args: argparse.Namespace, payload: Any, lines: Sequence[str]) -> None:
    """Machine output with --json, human lines otherwise (never both)."""
    if args.json:
        out.print_json(json.dumps(payload, default=str))
    else:
        for line in lines:
            out.print(line, markup=False, highlight=False)  # M[new][old] is text, not markup


def shard_dir(path: str | Path, period: str | None = None) -> Path:
    """The shard a verb was pointed at: ``path`` itself, or the one shard under it.

    ``cssl ingest --out DIR`` writes ``DIR/<period>/``; the verbs that read a shard accept
    ``DIR`` too when it holds exactly one shard (or one of ``period``), and say which periods
    it holds when it holds several.
    """
    root = Path(path)
    if not root.is_dir() or (root / MANIFEST).is_file() or any(root.glob("*.parquet")):
        return root
    shards = sorted(p for p in root.iterdir() if (p / MANIFEST).is_file())
    if period is not None and (root / period / MANIFEST).is_file():
        chosen = root / period
    elif len(shards) == 1:
        chosen = shards[0]
    elif shards:
        names = ", ".join(p.name for p in shards)
        raise CliError(
            f"{root} holds the shards of periods {names}: give one of them, e.g. {shards[0]}"
        )
    else:
        return root
    console.print(f"{root} holds the shard of {chosen.name}: using {chosen}")
    return chosen


# -- verbs -------------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from cssl_core.data.simulate import simulate_period

    params = _params(args)
    cfg = params.simulate.model_copy(
        update={
            k: v
            for k, v in {
                "frames_per_period": args.frames_per_period,
                "size": args.size,
                "seed": args.seed,
            }.items()
            if v is not None
        }
    )
    names = params.period_names
    if args.periods is not None:
        names = [f"p{i + 1:02d}" for i in range(args.periods)]
    selected = args.only or names
    unknown = sorted(set(selected) - set(names))
    if unknown:
        raise CliError(f"--only names unknown periods {unknown}; known: {names}")
    manifests = []
    for index, period in enumerate(names):
        if period not in selected:
            continue
        with _progress(cfg.frames_per_period, f"simulate {period}") as progress:
            manifest = simulate_period(
                Path(args.out),
                period,
                index,
                len(names),
                cfg,
                rows_per_group=params.ingest.rows_per_group,
                progress=_advance(progress),
            )
        manifests.append(manifest)
    lines = [
        f"{m['period']}: {m['num_rows']} frames ({m['splits'].get('train', 0)} train, "
        f"{m['splits'].get('eval', 0)} eval), games: {', '.join(sorted(m['categories']))}"
        for m in manifests
    ]
    _emit(args, manifests, [*lines, f"shards written under {args.out}/"])
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    import tempfile

    from cssl_core.data.ingest import ingest
    from cssl_core.data.storage import download_prefix
    from pipelines.events import SHARD_PUBLISHED, emit_shard_published

    params = _params(args)
    cfg = params.ingest.model_copy(
        update={
            k: v
            for k, v in {
                "fps": args.fps,
                "eval_fraction": args.eval_fraction,
                "size": args.size,
            }.items()
            if v is not None
        }
    )
    sources = list(args.sources)
    labels_from_dirs = args.labels_from_dirs
    if not sources:
        if params.period_source(args.period) == "simulate":
            from cssl_core.data.simulate import simulate_period

            index = params.period_index(args.period)
            manifest = simulate_period(
                Path(args.out),
                args.period,
                index,
                len(params.periods),
                params.simulate,
                rows_per_group=cfg.rows_per_group,
            )
            where = Path(args.out) / args.period
            _emit(
                args,
                {**manifest, "path": str(where)},
                [f"{args.period}: simulated {manifest['num_rows']} frames; shard at {where}"],
            )
            return EXIT_OK
        # The period's own source is ingested as the refresh flow ingests it (an image
        # folder's sub-folders are categories), so `dvc repro` remakes the flow's shard.
        sources, labels_from_dirs = [params.period_source(args.period)], True
    with tempfile.TemporaryDirectory(prefix="cssl-source-") as staging:
        local = [str(download_prefix(s, staging)) if s.startswith("s3://") else s for s in sources]
        with _progress(None, f"ingest {args.period}") as progress:
            advance = _advance(progress)
            report = ingest(
                local,
                args.period,
                Path(args.out),
                cfg,
                labels_from_dirs=labels_from_dirs,
                category=args.category,
                progress=lambda _source, n: advance(n),
            )
    lines = report.summary_lines()
    if emit_shard_published(args.period, str(report.path.resolve()), report.manifest):
        lines.append(f"sent {SHARD_PUBLISHED} for {args.period} to the Prefect server")
    _emit(args, report.as_dict(), lines)
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from cssl_core.data.validate import validate_shard

    params = _params(args)
    report = validate_shard(shard_dir(args.shard), params.ingest, repair=not args.check)
    _emit(args, report.as_dict(), report.summary_lines())
    return EXIT_OK if report.clean or not args.check else EXIT_FAILED


def cmd_config(args: argparse.Namespace) -> int:
    if args.schema:
        out.print_json(json.dumps(json_schema()))
        return EXIT_OK
    params = _params(args)
    payload = params.model_dump(mode="json")
    if args.json:
        out.print_json(json.dumps(payload))
    else:
        import yaml

        out.print(yaml.safe_dump(payload, sort_keys=False).rstrip())
        out.print(f"# config hash {params.config_hash()}")
    return EXIT_OK


def _print_refresh(summary: dict[str, Any]) -> None:
    period, version = summary["period"], summary["version"]
    if summary["skipped"]:
        out.print(f"[bold]{period}[/]: already refreshed as version {version}; nothing to do")
        return
    verdict = "[green]promoted to @champion[/]" if summary["promoted"] else "[red]rejected[/]"
    out.print(f"[bold]{period}[/]: version {version} {verdict}")
    for reason in summary["reasons"]:
        out.print(f"    {escape(reason)}")
    t = summary["timings"]
    resumed = f", resumed from step {summary['resumed_from']}" if summary["resumed_from"] else ""
    out.print(
        f"    accuracy {summary['average_accuracy']:.3f} avg, forgetting "
        f"{summary['forgetting']:.3f}; {t['total']:.0f} s (train {t['train']:.0f} s, "
        f"evaluate {t['evaluate']:.0f} s, other {t['orchestration']:.1f} s){resumed}"
    )


class TrainingProgress:
    """Training progress on the console: period, step, images/s and the time left for all
    the training this command expects (``total_steps``, at the pace since the first step, so
    evaluation and registration between periods are counted in). A bar on a terminal, a line
    per tenth of a period otherwise (logs, CI)."""

    def __init__(self, total_steps: int) -> None:
        self.total = max(1, total_steps)
        self.done: dict[str, int] = {}
        self.skipped = 0
        self.first: tuple[float, int] | None = None  # when the first step came, steps done then
        self._bar: Any = None
        self._task: Any = None
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("[bold]train[/]"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                console=console,
                transient=True,
            )
            self._task = self._bar.add_task("train", total=self.total, info="")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def skip(self, steps: int) -> None:
        """A period that needed no training (already refreshed) leaves the estimate."""
        self.skipped += steps

    def time_left(self) -> float | None:
        """Seconds left at the pace since the first step (start-up costs once, not per step;
        evaluation and registration between periods are part of the pace)."""
        done = sum(self.done.values())
        if self.first is None or done <= self.first[1]:
            return None
        pace = (time.monotonic() - self.first[0]) / (done - self.first[1])
        return pace * max(0, self.total - self.skipped - done)

    def __call__(self, event: TrainStep) -> None:
        first = event.period not in self.done
        self.done[event.period] = event.step
        if self.first is None:
            self.first = (time.monotonic(), sum(self.done.values()))
        left = self.time_left()
        eta = "" if left is None else f", about {_duration(left)} left"
        info = (
            f"{event.period} step {event.step}/{event.steps}, "
            f"{event.images_per_second:.0f} img/s{eta}"
        )
        if self._bar is not None:
            if first:
                self._bar.start()
            self._bar.update(
                self._task, completed=sum(self.done.values()) + self.skipped, info=info
            )
            if event.step == event.steps:
                self._bar.stop()
                console.print(info)
        elif first or event.step == event.steps or event.step % max(1, event.steps // 10) == 0:
            console.print(info)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


@contextmanager
def flow_session(args: argparse.Namespace, progress: TrainingProgress) -> Iterator[None]:
    """What a verb that runs flows needs around them (see the module docstring)."""
    # Prefect's INFO lines stay in its logs (its API) and MLflow's ("creating tables...") off
    # the console; both are read when the library is first imported. A user's own setting
    # wins, and --debug shows everything.
    quiet = not args.debug and "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL" not in os.environ
    levels = ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "MLFLOW_LOGGING_LEVEL")
    quieted = [k for k in levels if quiet and k not in os.environ]
    os.environ.update({k: "WARNING" for k in quieted})
    from pipelines.prefect_server import quiet_console, start_local_server
    from pipelines.progress import listening

    def starting(attempt: int, timeout: int) -> None:
        again = "" if attempt == 1 else "no answer; once more, "
        console.print(f"starting the local Prefect server ({again}waiting up to {timeout} s)")

    server = None
    before = _child_pids()
    with stopping.handling_signals(), quiet_console() if quiet else nullcontext():
        try:
            server = start_local_server(on_start=starting)
            with listening(progress):
                yield
        finally:
            stopping.cancel_watchdog()
            progress.close()
            # The temporary server stops at exit, once Prefect has sent its last logs to it
            # (pipelines/prefect_server.py); anything else this command started stops now.
            keep = {server.pid} if server is not None and server.pid else set()
            stop_children(spare=before | keep)
            for name in quieted:
                os.environ.pop(name, None)


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def stop_children(spare: Collection[int] = (), timeout: float = 5.0) -> None:
    """Stop every process started since ``spare`` was taken and still running (terminate,
    then kill): the temporary server, torchrun and its workers."""
    import psutil

    children = [p for p in psutil.Process().children(recursive=True) if p.pid not in spare]
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def _period_steps(params: Params, period: str) -> int:
    """Training steps of one period, as the trainer counts them (for the progress line)."""
    from cssl_core.learn.strategy import strategy_spec

    return strategy_spec(params.train.strategy).steps_for(
        params.period_index(period), params.train.steps
    )


def cmd_refresh(args: argparse.Namespace) -> int:
    params = _params(args)
    shard = str(shard_dir(args.shard, args.period)) if args.shard else None
    period = params.period_names[-1] if args.period == "latest" else args.period
    declared = period is not None and params.is_declared(period)
    steps = _period_steps(params, period) if declared else params.train.steps
    with flow_session(args, TrainingProgress(steps)):
        from pipelines.refresh import refresh

        summary = refresh(
            args.period,
            shard=shard,
            source=args.source,
            params_path=args.params,
            overrides=_overrides(args),
        )
    if args.json:
        _emit(args, summary, [])
    else:
        _print_refresh(summary)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from pipelines.report import build_report, format_report

    report = build_report(_params(args))
    _emit(args, report.as_dict(), format_report(report))
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    from pipelines.registry import open_registry

    open_registry().promote(args.version)
    _emit(args, {"champion": args.version}, [f"@champion -> version {args.version}"])
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from pipelines.registry import open_registry

    moved = open_registry().rollback()
    _emit(
        args,
        {"from": moved.from_version, "to": moved.to_version},
        [f"@champion rolled back: version {moved.from_version} -> {moved.to_version}"],
    )
    return EXIT_OK


def cmd_embed(args: argparse.Namespace) -> int:
    from pipelines.embed import embed_shard

    result = embed_shard(args.model, shard_dir(args.shard), Path(args.out), split=args.split)
    _emit(
        args,
        result,
        [
            f"{result['rows']} embeddings of dimension {result['dim']} from {result['model']} "
            f"(version {result['version']}) -> {args.out}"
        ],
    )
    return EXIT_OK


# -- the embedding index: build, search, status, backfill ---------------------------------


def _index(args: argparse.Namespace, params: Params) -> Any:
    """The index ``--index`` names, else ``index.uri``, else ``CSSL_HOME/index``."""
    from pipelines.index import EmbeddingIndex

    return EmbeddingIndex(getattr(args, "index", None) or params.index.uri)


def _live_index(args: argparse.Namespace, params: Params) -> Any:
    """The index, or one line saying how to build it when there is none."""
    index = _index(args, params)
    if index.pointer().live is None:
        raise CliError(f"there is no index at {index.uri}: build one with `cssl index build SHARD`")
    return index


def _registered(registry: Any, ref: str) -> Any:
    """The finished version ``ref`` names (``@champion``, ``champion``, ``3``, models:/...)."""
    from pipelines.settings import MODEL_NAME

    if not registry.versions():
        raise CliError(
            f"no versions of {MODEL_NAME} yet in {registry.uri}: run `cssl refresh` or `cssl demo`"
        )
    info = registry.resolve(ref.removeprefix("@"))
    if info is None:
        raise CliError(
            f"{ref} names no finished version of {MODEL_NAME} in {registry.uri} (give "
            "@champion, @challenger, a version number or models:/NAME@ALIAS)"
        )
    return info


def _embedder(registry: Any, version: int) -> Any:
    from pipelines.backfill import embedder_dir, load_model

    return load_model(embedder_dir(registry, version))


def index_build(
    shards: Sequence[str | Path], model: str, index_uri: str | None
) -> tuple[Any, list[str]]:
    """Embed ``shards`` with the registered ``model`` into the index; the report and its lines
    (``cssl index build`` and the end of ``cssl demo``)."""
    from pipelines.backfill import compatibility, embedder_dir
    from pipelines.index import EmbeddingIndex
    from pipelines.index_build import build_index
    from pipelines.registry import open_registry

    registry = open_registry()
    info = _registered(registry, model)
    index = EmbeddingIndex(index_uri)
    live = index.pointer().live
    # Rows of another version may join the live table only when they are in its space.
    direct = (
        live is not None
        and live.model_version != info.version
        and compatibility(registry, live.model_version, info.version).via in ("direct", "same")
    )
    report = build_index(
        [str(shard_dir(s)) for s in shards],
        embedder_dir(registry, info.version),
        info.version,
        index.uri,
        compatible=direct,
    )
    lines = [
        f"{b.period}: "
        + (
            f"already indexed with version {report.model_version}, skipped"
            if b.skipped
            else f"{b.rows} frames embedded with version {report.model_version}"
        )
        for b in report.shards
    ]
    search = "IVF_PQ" if report.ann_index else "exact"
    lines.append(
        f"index {report.index_uri}: {report.rows_total} rows in {report.table} "
        f"({search} search), {report.rows_written} written in {report.seconds:.1f} s"
    )
    return report, lines


def cmd_index_build(args: argparse.Namespace) -> int:
    params = _params(args)
    report, lines = index_build(args.shards, args.model, args.index or params.index.uri)
    _emit(args, asdict(report), lines)
    return EXIT_OK


def _query(args: argparse.Namespace, index: Any) -> tuple[Any, Any, str]:
    """The query vector in the searched space, the one in the old space during a backfill,
    and what the query is (for the heading)."""
    from pipelines.index_build import embed_images
    from pipelines.registry import open_registry

    pointer = index.pointer()
    b = pointer.backfill
    if args.frame_id:
        if args.model is None:
            stored = index.stored_vectors(args.frame_id)
            if stored.vector is not None:
                return stored.vector, stored.old_vector, f"frame {args.frame_id}"
        # --model, or not re-embedded yet by the backfill in progress: embed the frame's image.
        from pipelines.backfill import index_shards
        from pipelines.index_build import read_chunk_images

        spec = index.frame_spec(args.frame_id)
        shards = {s.fingerprint: s for s in index_shards(index)}
        images = read_chunk_images(spec, shards)
        what = f"frame {args.frame_id}"
    else:
        from cssl_core.data.images import ImageRejected, decode_image

        path = Path(args.image)
        if not path.is_file():
            raise CliError(f"{path}: no such image file")
        images = [path.read_bytes()]
        try:
            decode_image(images[0])
        except ImageRejected as exc:
            raise CliError(f"{path} is not a readable image ({exc})") from None
        what = f"image {path}"
    registry = open_registry()
    space = b.target_version if b is not None else pointer.live.model_version
    if args.model is None:  # the index's own version(s): always correct
        query = embed_images(_embedder(registry, space), images)[0]
        old = None
        if b is not None:
            old = embed_images(_embedder(registry, b.source_version), images)[0]
        return query, old, what
    query, old, how = _mapped_query(registry, args.model, images, space, b)
    return query, old, f"{what} ({how})"


def _mapped_query(
    registry: Any, model: str, images: list[bytes], space: int, backfill: Any
) -> tuple[Any, Any, str]:
    """``cssl search --model``: the query embedded by ``model`` and mapped into the index's
    space through the compatibility chain (``pipelines.backfill.query_map``); during a backfill
    also into the source version's space, or else embedded by that version. With how."""
    from pipelines.backfill import compatibility, query_map
    from pipelines.index_build import embed_images

    load = functools.cache(functools.partial(_embedder, registry))  # each version once
    info = _registered(registry, model)
    embedding = embed_images(load(info.version), images)[0]
    compat = compatibility(registry, space, info.version)
    if not compat.compatible:
        named = "" if model == str(info.version) else f" ({model})"
        raise CliError(
            f"version {info.version}{named} is not compatible with the index's version "
            f"{space}: {compat.reason}; search without --model (the index's own version) or "
            f"`cssl backfill --to {info.version}`"
        )
    query = query_map(compat, load)(embedding)
    old = None
    if backfill is not None:
        to_source = compatibility(registry, backfill.source_version, info.version)
        old = (
            query_map(to_source, load)(embedding)
            if to_source.compatible
            else embed_images(load(backfill.source_version), images)[0]
        )
    how = f"embedded by version {info.version}"
    if compat.via != "same":
        how += f", mapped into version {space}'s space ({compat.via})"
    return query, old, how


def search_lines(index: Any, hits: Sequence[Any], what: str) -> list[str]:
    """Search hits as a table, best first."""
    pointer = index.pointer()
    space = f"version {pointer.live.model_version}"
    if pointer.backfill is not None:
        b = pointer.backfill
        space = f"versions {b.source_version} and {b.target_version} (backfill in progress)"
    lines = [
        f"top {len(hits)} for {what} in {index.uri} ({space}):",
        f"  {'rank':>4}  {'score':>6}  {'frame_id':<32}  {'period':<8}  {'category':<16}  "
        f"{'split':<5}  version",
    ]
    for rank, h in enumerate(hits, 1):
        lines.append(
            f"  {rank:>4}  {h.score:6.3f}  {h.frame_id:<32}  {h.period:<8}  "
            f"{h.category or '-':<16}  {h.split:<5}  {h.model_version}"
        )
    return lines


def demo_index(shards: Sequence[Path], index_uri: str | None) -> tuple[list[str], str | None]:
    """The end of ``cssl demo``: index the demo's frames with @champion and search for the
    neighbours of one eval frame of the last period. Its lines, and that frame's id."""
    from pipelines.index import EmbeddingIndex, EmbeddingIndexError

    t0 = time.perf_counter()
    try:
        _, lines = index_build(shards, "@champion", index_uri)
    except EmbeddingIndexError as exc:  # e.g. @champion moved since the index was built
        lines = [f"{exc}".splitlines()[0]]
    index = EmbeddingIndex(index_uri)
    if index.pointer().live is None:
        return lines, None
    frame = Shard.open(shards[-1]).read(["frame_id"], split="eval")["frame_id"][0].as_py()
    stored = index.stored_vectors(frame)
    if stored.vector is None:  # a backfill is half way: `cssl search` embeds it then
        return lines, frame
    hits = index.search(stored.vector, 6, old_query=stored.old_vector)
    lines += search_lines(index, [h for h in hits if h.frame_id != frame][:5], f"frame {frame}")
    lines.append(f"(index build and search: {time.perf_counter() - t0:.1f} s)")
    return lines, frame


def cmd_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise CliError(f"--k must be >= 1, got {args.k}")
    index = _live_index(args, _params(args))
    query, old, what = _query(args, index)
    # A frame is its own best match: ask for one more and leave it out.
    extra = 1 if args.frame_id else 0
    hits = index.search(query, args.k + extra, old_query=old)
    hits = [h for h in hits if h.frame_id != args.frame_id][: args.k]
    payload = {"query": what, "hits": [asdict(h) for h in hits]}
    _emit(args, payload, search_lines(index, hits, what))
    return EXIT_OK


def cmd_index_status(args: argparse.Namespace) -> int:
    from pipelines.backfill import compatibility
    from pipelines.registry import open_registry

    index = _live_index(args, _params(args))
    status = index.status()
    registry = open_registry()
    champion = registry.champion()
    compat = None
    if champion is not None and status.live_version is not None:
        compat = compatibility(registry, status.live_version, champion.version)
    search = (
        "IVF_PQ search"
        if status.ann_index
        else f"exact search (IVF_PQ from {index.ann_min_rows:,} rows)"
    )
    per_version = ", ".join(f"v{v}: {n}" for v, n in status.rows_per_version.items())
    lines = [
        f"index {status.uri}: {status.rows} rows",
        f"  live: table {status.live_table}, model version {status.live_version}, "
        f"D={status.dim}, {search}",
        f"  rows per model version: {per_version}",
    ]
    if compat is None:
        lines.append("  @champion: none yet")
    elif compat.compatible:
        lines.append(
            f"  @champion: version {compat.target_version}, compatible with the index "
            f"({compat.via}: {compat.reason})"
        )
        if compat.via != "same":
            lines.append(
                "  `cssl search --model @champion` queries it with @champion's embeddings "
                "(mapped into the index's space)"
            )
    else:
        lines.append(
            f"  @champion: version {compat.target_version}, NOT compatible with the index "
            f"({compat.reason}); `cssl backfill` re-embeds it with @champion"
        )
    if status.table_versions:
        first, last = status.table_versions[0], status.table_versions[-1]
        lines.append(
            f"  LanceDB versions of {status.live_table}: {first.version}..{last.version} "
            f"(latest {last.timestamp:%Y-%m-%d %H:%M:%S})"
        )
    lines.append(
        "  history: "
        + ", ".join(f"{h.table} (v{h.model_version}) from {h.live_from}" for h in status.history)
    )
    if status.backfill is not None:
        b = status.backfill
        lines.append(
            f"  backfill to version {b.target_version} in progress: {b.chunks_done}/{b.chunks} "
            f"chunks, {b.rows_done}/{b.rows} rows ({b.order} order); `cssl backfill --to "
            f"{b.target_version}` resumes it"
        )
    payload = {"status": asdict(status), "champion": asdict(compat) if compat else None}
    _emit(args, payload, lines)
    return EXIT_OK


def cmd_backfill(args: argparse.Namespace) -> int:
    from pipelines.backfill import (
        compatibility,
        embedder_dir,
        index_shards,
        run_backfill,
        run_distributed_backfill,
    )
    from pipelines.registry import open_registry

    params = _params(args)
    if args.workers < 1:
        raise CliError(f"--workers must be >= 1, got {args.workers}")
    index = _live_index(args, params)
    registry = open_registry()
    pointer = index.pointer()
    live, running = pointer.live, pointer.backfill
    if args.to is None and running is not None:
        version = running.target_version  # resume what was started
    else:
        version = _registered(registry, args.to or "@champion").version
    if running is None and version == live.model_version:
        _emit(args, {"switched": False}, [f"the index is already on version {version}"])
        return EXIT_OK
    if running is None:
        compat = compatibility(registry, live.model_version, version)
        note = "compatible, re-embedding anyway" if compat.compatible else "not compatible"
        console.print(f"version {version} vs the index's version {live.model_version}: {note}")
    else:
        console.print(
            f"resuming the backfill to version {running.target_version}: "
            f"{len(index.pending_chunks())} of {running.chunks} chunks to go"
        )
    model_dir = embedder_dir(registry, version)
    shards = [str(s.path) for s in index_shards(index, args.shard or (), params.store.root)]
    common = {"order": args.order, "chunk_size": args.chunk_size}
    if args.workers == 1 and not args.dask_address:

        def committed(chunk: int, done: int) -> None:
            total = index.pointer().backfill.chunks
            console.print(f"committed chunk {chunk} ({done}/{total} chunks)")

        report = run_backfill(index.uri, shards, model_dir, version, on_commit=committed, **common)
    else:
        if not args.debug:  # Dask's INFO lines and shutdown heartbeats; task errors still fail
            os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
        with flow_session(args, TrainingProgress(1)):
            report = run_distributed_backfill(
                index.uri,
                shards,
                model_dir,
                version,
                workers=args.workers,
                address=args.dask_address,
                **common,
            )
    lines = [
        f"backfilled {report.rows} rows to version {version} in {report.seconds:.1f} s "
        f"({report.chunks_run} of {report.chunks} chunks this run, "
        f"{report.chunks_committed_before} committed before; {report.order} order)"
    ]
    if report.switched:
        lines.append(
            f"switched: the index now serves version {version}; the table of version "
            f"{report.source_version} is kept (LanceDB history)"
        )
    _emit(args, report.as_dict(), lines)
    return EXIT_OK


def _command(name: str) -> str:
    """How the user runs ``name`` from here: the script next to this Python (relative to the
    current directory when it is below it, e.g. ``.venv/bin/cssl``), else the bare name."""
    script = Path(sys.executable).parent / name
    return str(_here(script)) if script.exists() else name


def _here(path: Path) -> Path:
    """``path`` relative to the current directory when it is below it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def explore_lines(
    home: Path,
    shards: Path,
    periods: Sequence[str],
    env: Mapping[str, str],
    frame_id: str | None = None,
) -> list[str]:
    """Commands that work verbatim after the demo, with the settings that reach its state."""
    cssl = "".join(f"{k}={v} " for k, v in env.items()) + _command("cssl")
    db = _here(home / "mlflow.db")
    lines = [
        "Explore:",
        f"  {cssl} report    # accuracy matrix, metrics and lineage, from MLflow",
        f"  {cssl} embed {_here(shards / periods[-1])} --out embeddings.parquet",
        f"  {cssl} rollback  # @champion back to the previous one (`cssl promote N` to move it)",
        f"  {_command('mlflow')} ui --backend-store-uri sqlite:///{db}  # runs, plots, registry",
    ]
    if frame_id is not None:
        lines += [
            f"  {cssl} search --frame-id {frame_id} --k 5  # nearest frames in the index",
            f"  {cssl} index status  # versions in the index; compatible with @champion?",
        ]
    return lines


DEMO_STREAMS = ("drifting", "static-then-shift")
"""``cssl demo --stream``: ``drifting`` (games rise and fade every period, every period is
refreshed) or ``static-then-shift`` (the same game mix until the last period switches to new
games; the first period is refreshed and ``watch`` decides for each later one)."""


def static_then_shift(periods: int) -> list[str]:
    """The overrides of ``cssl demo --stream static-then-shift`` for ``periods`` periods: a
    static stretch, then a sudden switch to new games in the last period; no cooldown (the
    demo replays a month per minute, so every refresh would start within a day of the last)."""
    schedule = f"[{{kind: static, periods: {periods - 1}}}, {{kind: sudden}}]"
    return [f"simulate.schedule={schedule}", "watch.cooldown=0s"]


def cmd_demo(args: argparse.Namespace) -> int:
    from cssl_core.data.simulate import simulate_period

    # The demo's state is the default state (CSSL_HOME, SQLite MLflow in it, the store under
    # it), so `cssl report`, `embed`, `promote`, `rollback` and `mlflow ui` find it as is. A
    # variant keeps its own state (.cssl/<variant>), so the two demos never mix periods.
    env: dict[str, str] = {}
    variant = args.stream != "drifting"
    if args.workdir:
        os.environ["CSSL_HOME"] = str(Path(args.workdir).resolve())
    elif variant and not os.environ.get("CSSL_HOME"):
        os.environ["CSSL_HOME"] = str(_here(state_dir() / args.stream))
    if os.environ.get("CSSL_HOME"):
        env["CSSL_HOME"] = os.environ["CSSL_HOME"]
    if os.environ.pop("MLFLOW_TRACKING_URI", None):
        env["MLFLOW_TRACKING_URI"] = ""  # the demo keeps its registry in SQLite, not there
    home = state_dir()
    shards = home / "demo" / "shards"
    overrides = [f"store.root={home / 'store'}", *(args.set or [])]
    names = load_params(args.params, overrides).period_names
    if variant:
        if len(names) < 3:
            raise CliError(f"--stream {args.stream} needs at least 3 periods in params.yaml")
        overrides = [*static_then_shift(len(names)), *overrides]
    params = load_params(args.params, overrides)
    # A period watch skips is not part of the lineage: the flows are told only the first
    # period, so each later one continues the lineage that ran (as an undeclared period).
    flows = overrides
    if variant:
        flows = [*overrides, f"periods={json.dumps({names[0]: {'previous': ''}})}"]
    t0 = time.perf_counter()
    out.print(
        f"[bold]cssl demo[/]: {len(names)} periods of {params.simulate.frames_per_period} "
        f"simulated Atari stream frames; strategy {params.train.strategy}, "
        f"{params.train.steps} steps per period; state in {home}/"
    )
    if variant:
        out.print(
            f"stream {args.stream}: {', '.join(names[:-1])} show the same game mix, "
            f"{names[-1]} switches to new games. {names[0]} is refreshed; for each later "
            "period the watch flow checks the frames for drift under @champion and starts a "
            "refresh only if it finds drift (watch.cooldown is 0 s here: the demo replays a "
            "month in minutes)"
        )
    for index, period in enumerate(names):
        if not (shards / period / MANIFEST).is_file():
            with _progress(params.simulate.frames_per_period, f"simulate {period}") as progress:
                simulate_period(
                    shards,
                    period,
                    index,
                    len(names),
                    params.simulate,
                    rows_per_group=params.ingest.rows_per_group,
                    progress=_advance(progress),
                )
    training = TrainingProgress(sum(_period_steps(params, p) for p in names))
    with flow_session(args, training):
        from pipelines.refresh import refresh
        from pipelines.report import build_report, format_report
        from pipelines.watch import watch

        for index, period in enumerate(names):
            shard = str(shards / period)
            if variant and index > 0:
                out.rule(f"watch {period}")
                record = watch(period, shard=shard, params_path=args.params, overrides=flows)
                _print_watch(record)
                done = record["refresh"].get("summary")
                if done is None or done["skipped"]:
                    training.skip(_period_steps(params, period))
                continue
            out.rule(f"refresh {period}")
            summary = refresh(period, shard=shard, params_path=args.params, overrides=flows)
            if summary["skipped"]:
                training.skip(_period_steps(params, period))
            _print_refresh(summary)
        out.rule("report (read back from MLflow)")
        for line in format_report(build_report(load_params(args.params, flows))):
            out.print(line, markup=False, highlight=False)
    out.rule("embedding index (LanceDB) and a search")
    lines, frame = demo_index([shards / p for p in names], params.index.uri)
    for line in lines:
        out.print(escape(line))
    minutes = (time.perf_counter() - t0) / 60
    out.print(f"\n[bold]done in {minutes:.1f} min.[/]")
    for line in explore_lines(home, shards, names, env, frame):
        out.print(line)
    out.print(f"Rerunning is idempotent; delete {_here(home)} to start over.")
    return EXIT_OK


def _print_watch(record: dict[str, Any]) -> None:
    refresh = record["refresh"]
    colour = "green" if record["action"] == "refresh" else "yellow"
    out.print(f"[bold]{record['period']}[/]: [{colour}]{record['summary']}[/]")
    for reason in record["reasons"]:
        out.print(f"    {reason}")
    out.print(f"    recorded as run {record['run_id']} of the MLflow experiment cssl-watch")
    if refresh.get("mode") == "deployment":
        out.print(f"    started flow run {refresh['flow_run_id']} of {refresh['deployment']}")
    elif refresh.get("mode") == "in-process":
        _print_refresh(refresh["summary"])


def cmd_watch(args: argparse.Namespace) -> int:
    params = _params(args)
    shard = str(shard_dir(args.shard, args.period)) if args.shard else None
    with flow_session(args, TrainingProgress(params.train.steps)):
        from pipelines.watch import watch

        record = watch(
            args.period,
            shard=shard,
            source=args.source,
            force=args.force,
            params_path=args.params,
            overrides=_overrides(args),
        )
    if args.json:
        _emit(args, record, [])
    else:
        _print_watch(record)
    return EXIT_OK


def cmd_drift(args: argparse.Namespace) -> int:
    from pipelines.drift import run_drift
    from pipelines.registry import open_registry

    params = _params(args)
    shard = str(shard_dir(args.shard, args.period)) if args.shard else None
    reference = args.reference
    if reference is not None and Path(reference).is_dir():
        reference = str(shard_dir(reference))
    report = run_drift(
        params,
        open_registry(),
        period=args.period,
        shard=shard,
        reference=reference,
        model=args.model,
        log=not args.no_log,
    )
    lines = report.lines()
    if report.run_id:
        lines.append(f"    recorded as run {report.run_id} of the MLflow experiment cssl-drift")
    _emit(args, report.to_dict(), lines)
    return EXIT_DRIFT if args.fail_on_drift and report.drifted else EXIT_OK


def cmd_lineage(args: argparse.Namespace) -> int:
    from pipelines.lineage import append_periods, periods_to_export, ran_periods
    from pipelines.registry import open_registry

    target = None
    if args.write is not None:
        target = Path(args.write or args.params or "params.yaml")
        params = load_params(target, list(args.set or ()))
    else:
        params = _params(args)
    ran = ran_periods(open_registry())
    new = periods_to_export(params, ran)
    if target is not None:
        append_periods(target, new)
    lines = ["periods that ran (stream order): " + (", ".join(p.name for p in ran) or "none")]
    if new:
        lines.append("not in params.yaml (add them under periods:, or use --write):")
        lines += [f"  {p.yaml_entry()}" for p in new]
    else:
        lines.append("params.yaml already declares every period that ran")
    if target is not None and new:
        lines.append(
            f"appended {len(new)} period(s) to {target}; `dvc repro train@{new[-1].name}` "
            "rebuilds it"
        )
    payload = {
        "ran": [p.as_dict() for p in ran],
        "exported": [p.as_dict() for p in new],
        "written": str(target) if target is not None and new else None,
    }
    _emit(args, payload, lines)
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.dvc_stages import train_stage

    result = train_stage(
        _params(args), args.period, Path(args.shards), Path(args.models), Path(args.memory)
    )
    _emit(args, result, [f"{args.period}: {result['weights_sha256']} -> {result['model_dir']}"])
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines.dvc_stages import evaluate_stage

    result = evaluate_stage(
        _params(args), args.period, Path(args.shards), Path(args.models), Path(args.out)
    )
    _emit(
        args,
        result,
        [f"{p}: knn {s['knn']:.3f}, linear {s['linear']:.3f}" for p, s in result["scores"].items()],
    )
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the verb (``cssl --debug validate X`` or after X)."""
    opts = argparse.ArgumentParser(add_help=False)
    default: Any = argparse.SUPPRESS if suppress else None
    flag: Any = argparse.SUPPRESS if suppress else False
    opts.add_argument("--params", default=default, help="params file (default: ./params.yaml)")
    opts.add_argument(
        "--set",
        action="append",
        default=default,
        metavar="KEY=VALUE",
        help="override a param, e.g. train.steps=50 (repeatable)",
    )
    opts.add_argument("--json", action="store_true", default=flag, help="JSON on stdout")
    opts.add_argument("--debug", action="store_true", default=flag, help="show tracebacks")
    return opts


def _distributed_options(p: argparse.ArgumentParser) -> None:
    """torchrun placement of the training step (params.yaml ``distributed:``)."""
    g = p.add_argument_group("distributed training (torchrun/DDP; the train step only)")
    g.add_argument("--nproc-per-node", type=int, metavar="N", help="training processes per node")
    g.add_argument("--nnodes", type=int, metavar="M", help="nodes (needs --rdzv-endpoint)")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="c10d rendezvous of the nodes")


def build_parser() -> argparse.ArgumentParser:
    top, common = _common_options(suppress=False), _common_options(suppress=True)
    parser = argparse.ArgumentParser(
        prog="cssl",
        description="Keep an image-embedding model fresh on a drifting stream of video frames.",
        parents=[top],
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> Any:
        p = verbs.add_parser(name, help=help_, description=help_, parents=[common])
        p.set_defaults(func=func)
        return p

    p = verb("simulate", cmd_simulate, "Simulate a Twitch-like stream of Atari games as shards.")
    p.add_argument("--out", required=True, help="directory that receives one shard per period")
    p.add_argument("--periods", type=int, help="number of periods (default: params.yaml periods)")
    p.add_argument("--frames-per-period", type=int)
    p.add_argument("--size", type=int, help="frame size in pixels (square)")
    p.add_argument("--seed", type=int)
    p.add_argument("--only", action="append", metavar="PERIOD", help="simulate only this period")

    p = verb("ingest", cmd_ingest, "Turn videos, image folders or Parquet into a period shard.")
    p.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="video files, image folders or Parquet (default: params.yaml ingest.source)",
    )
    p.add_argument("--period", required=True)
    p.add_argument("--out", required=True, help="shard root; the shard lands in OUT/PERIOD")
    p.add_argument("--fps", type=float, help="frames per second sampled from videos")
    p.add_argument("--eval-fraction", type=float, help="held-out eval share, stable across reruns")
    p.add_argument("--size", type=int, help="resize so the shorter side is SIZE pixels")
    p.add_argument("--labels-from-dirs", action="store_true", help="category = sub-folder name")
    p.add_argument("--category", help="category for every frame (e.g. the game of a video)")

    p = verb("validate", cmd_validate, "Decode every frame of a shard; quarantine bad ones.")
    p.add_argument("shard", help="shard directory (OUT/PERIOD) or a folder of Parquet files")
    p.add_argument(
        "--check", action="store_true", help="report only; exit 1 if anything would be quarantined"
    )

    p = verb("config", cmd_config, "Print the effective configuration or its JSON schema.")
    p.add_argument("--schema", action="store_true", help="print the JSON schema of params.yaml")

    p = verb("bench", lambda a: a.bench_parser.print_help() or EXIT_USAGE, "Run a benchmark.")
    p.set_defaults(bench_parser=p)
    from benchmarks.cli import add_bench_parsers  # torch-free: options only

    add_bench_parsers(p.add_subparsers(dest="bench", metavar="BENCH"), common)

    p = verb("refresh", cmd_refresh, "Refresh the model for one period (the Prefect flow).")
    p.add_argument(
        "--period",
        help="a period of params.yaml, 'latest' (the last one there), 'auto' (the calendar "
        "period now, calendar.periods_every), or a new name (it continues @champion's lineage); "
        "default: the period of --shard, or the last path component of --source",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--shard", help="a validated shard directory (OUT/PERIOD)")
    where.add_argument(
        "--source",
        help="raw frames to ingest first: path or s3://bucket/prefix (default: the period's "
        "source in params.yaml, e.g. simulate)",
    )
    _distributed_options(p)

    p = verb("report", cmd_report, "Accuracy matrix, metrics and lineage, read from MLflow.")

    p = verb("promote", cmd_promote, "Point @champion at a registered version.")
    p.add_argument("version", type=int)

    p = verb("rollback", cmd_rollback, "Move @champion back to the previous champion.")

    p = verb("embed", cmd_embed, "Write embeddings of a shard's frames to Parquet.")
    p.add_argument("shard", help="shard directory")
    p.add_argument("--model", default="models:/stream-embedding@champion", help="MLflow model URI")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--split", choices=["train", "eval"], help="only this split")

    p = verb("demo", cmd_demo, "Simulate 4 periods and refresh each (embedded defaults).")
    p.add_argument(
        "--workdir",
        help="keep the demo's state here instead of the default state folder (CSSL_HOME, .cssl)",
    )
    p.add_argument(
        "--stream",
        choices=DEMO_STREAMS,
        default="drifting",
        help="drifting: every period refreshed (default); static-then-shift: the same games "
        "until the last period, the first refreshed and `watch` deciding for the others "
        "(state in .cssl/static-then-shift unless --workdir or CSSL_HOME)",
    )

    p = verb("drift", cmd_drift, "Do a shard's frames differ from a reference? (MMD test)")
    p.add_argument("--period", help="the period checked (default: the shard's)")
    p.add_argument(
        "--shard", help="the new frames: a shard directory (default: the period's in the store)"
    )
    p.add_argument(
        "--reference",
        metavar="DIR_OR_PERIOD",
        help="a shard directory, or a period whose shard is in the store (default: "
        "drift.reference: champion | previous | memory)",
    )
    p.add_argument(
        "--model",
        help="embed with this model: a version, an alias, a models:/ URI or an embedder "
        "directory (default: @champion)",
    )
    p.add_argument(
        "--fail-on-drift", action="store_true", help=f"exit {EXIT_DRIFT} when drift is found"
    )
    p.add_argument("--no-log", action="store_true", help="do not record the check in MLflow")

    p = verb("watch", cmd_watch, "Refresh a new period only if it drifted or @champion is old.")
    p.add_argument(
        "--period",
        help="the period (default: the shard's, or the source's last path component; 'auto': "
        "the calendar period now)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--shard", help="the new period's shard directory")
    where.add_argument("--source", help="raw frames to ingest first: path or s3://bucket/prefix")
    p.add_argument("--force", action="store_true", help="refresh whatever the checks say")

    p = verb("lineage", cmd_lineage, "The periods that ran, for params.yaml and DVC.")
    lineage = p.add_subparsers(dest="lineage_action", required=True, metavar="ACTION")
    e = lineage.add_parser(
        "export",
        parents=[common],
        help="print the periods that ran and params.yaml does not declare",
        description="Print the periods that ran (name, previous, source) and params.yaml "
        "does not declare; --write appends them to its periods: block, so `dvc repro "
        "train@<period>` rebuilds any of them.",
    )
    e.add_argument(
        "--write",
        nargs="?",
        const="",
        metavar="PARAMS_YAML",
        help="append them to this params file (default: --params, else ./params.yaml)",
    )

    p = verb("index", lambda a: a.index_parser.print_help() or EXIT_USAGE, "The embedding index.")
    p.set_defaults(index_parser=p)
    actions = p.add_subparsers(dest="index_action", metavar="ACTION")
    b = actions.add_parser(
        "build",
        parents=[common],
        help="embed shards' frames into the index (LanceDB)",
        description="Embed every frame of the shards with a registered model and add them to "
        "the embedding index (rows already indexed with that version are skipped).",
    )
    b.set_defaults(func=cmd_index_build)
    b.add_argument("shards", nargs="+", metavar="SHARD", help="shard directories")
    b.add_argument(
        "--model", default="@champion", help="registered version: @champion, 3, models:/..."
    )
    b.add_argument("--index", help="index location: directory or s3://... (default: index.uri)")
    st = actions.add_parser(
        "status",
        parents=[common],
        help="rows per model version, live version, table versions, compatibility",
        description="Rows per model version, the live version, LanceDB table versions, the "
        "backfill in progress, and whether @champion is compatible with the index.",
    )
    st.set_defaults(func=cmd_index_status)
    st.add_argument("--index", help="index location (default: index.uri)")

    p = verb("search", cmd_search, "Top-k frames of the index most similar to an image or frame.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="an image file (embedded with the index's model version)")
    what.add_argument("--frame-id", help="a frame of the index")
    p.add_argument(
        "--model",
        metavar="VERSION",
        help="embed the query with this version (@champion, a number, ...) and map it into "
        "the index's space through its compatibility chain (cssl.compat direct / adapter); "
        "an error when not compatible (default: the index's own version)",
    )
    p.add_argument("--k", type=int, default=10, help="results (default 10)")
    p.add_argument("--index", help="index location (default: index.uri)")

    p = verb("backfill", cmd_backfill, "Re-embed the index with another version, then switch.")
    p.add_argument(
        "--to",
        metavar="VERSION",
        help="target version: a number, @champion, ... (default: the backfill in progress, "
        "else @champion)",
    )
    p.add_argument("--workers", type=int, default=1, help="Dask workers (1: in this process)")
    p.add_argument("--dask-address", help="an existing Dask scheduler, tcp://host:8786")
    p.add_argument(
        "--shard",
        action="append",
        metavar="DIR",
        help="a shard holding indexed frames (default: where they were indexed from, or the store)",
    )
    p.add_argument("--order", choices=["uncertainty", "random"], default="uncertainty")
    p.add_argument("--chunk-size", type=int, default=512, help="rows per chunk (and commit)")
    p.add_argument("--index", help="index location (default: index.uri)")

    p = verb("train", cmd_train, "DVC stage: train one period from files (no MLflow).")
    p.add_argument("--period", required=True)
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--models", default="data/models")
    p.add_argument("--memory", default="data/memory", help="where replay memory versions live")
    _distributed_options(p)

    p = verb("evaluate", cmd_evaluate, "DVC stage: evaluate one period's model on periods so far.")
    p.add_argument("--period", required=True)
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--models", default="data/models")
    p.add_argument("--out", default="data/metrics")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stopping.reset()
    try:
        return int(args.func(args))
    except BaseException as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        signum = stopping.requested()
        if signum is None and isinstance(exc, KeyboardInterrupt):
            signum = signal.SIGINT
        if signum is not None and not args.debug:
            console.print(
                f"[red]stopped[/] by {signal.Signals(signum).name}: the run is marked FAILED "
                "and the processes this command started are stopped; rerun the same command "
                "to finish (training resumes from its last checkpoint)",
                soft_wrap=True,
            )
            return 128 + int(signum)
        if args.debug or not isinstance(exc, Exception):
            raise
        # Our own exceptions (cssl_core, pipelines) carry one-line messages written for users
        # (RegistryError, RefreshBusy, TrainingDiverged, StoreError...); a library's do not.
        known = (CliError, ConfigError, ValueError, FileNotFoundError, PermissionError, OSError)
        ours = type(exc).__module__.split(".")[0] in {"cssl_core", "pipelines"}
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if not (ours or isinstance(exc, known)):
            message = f"{exc.__class__.__name__}: {message} (run with --debug for the traceback)"
        console.print(f"[red]error:[/] {message}", soft_wrap=True)
        return EXIT_FAILED
    finally:
        stopping.reset()


if __name__ == "__main__":
    sys.exit(main())
