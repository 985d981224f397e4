"""The benchmarks' command line (benchmarks/cli.py): every benchmark registered on a ``bench``
verb, torch-free to build, and tiny real runs of ``bench train`` and ``bench peers``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cli
from benchmarks.machine import cpu_kind

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "prefect", "mlflow", "ale_py", "av", "matplotlib", "lightly")
TINY_MODEL = [
    "--set",
    "model.backbone=resnet10t",
    "--set",
    "model.input_size=32",
    "--set",
    "model.projector_hidden=64",
    "--set",
    "model.projector_dim=32",
    "--set",
    "model.predictor_hidden=64",
]


def _cssl_like_parser() -> argparse.ArgumentParser:
    """A parser shaped like ``cssl``'s: a ``bench`` verb whose sub-commands come from
    :func:`cli.add_bench_parsers` with a common parent parser."""
    parser = argparse.ArgumentParser(prog="cssl")
    verbs = parser.add_subparsers(dest="verb", required=True)
    bench = verbs.add_parser("bench")
    cli.add_bench_parsers(bench.add_subparsers(dest="bench", required=True), cli.common_options())
    return parser


def test_bench_parsers_register_every_benchmark_with_its_command() -> None:
    parser = _cssl_like_parser()
    args = parser.parse_args(["bench", "train", "--steps", "2"])
    assert args.func is cli.cmd_train and args.steps == 2 and args.sweep is False
    assert args.strategies is None and args.params is None and args.json is False
    args = parser.parse_args(["bench", "train", "--set", "train.strategy=finetune", "--json"])
    assert args.set == ["train.strategy=finetune"] and args.json
    funcs = {
        name: parser.parse_args(["bench", name, *extra]).func
        for name, extra in [
            ("ingest", []),
            ("train", []),
            ("scaling", []),
            ("continual", ["--dataset", "stream", "--out", "x"]),
            ("peers", []),
            ("gate", ["--out", "x"]),
        ]
    }
    assert funcs == {
        "ingest": cli.cmd_ingest,
        "train": cli.cmd_train,
        "scaling": cli.cmd_scaling,
        "continual": cli.cmd_continual,
        "peers": cli.cmd_peers,
        "gate": cli.cmd_gate,
    }
    with pytest.raises(SystemExit) as usage:
        parser.parse_args(["bench", "train", "--precisions", "fp16"])
    assert usage.value.code == 2


def test_bench_gate_takes_its_options() -> None:
    from benchmarks.gate import MARGINS

    args = _cssl_like_parser().parse_args(
        ["bench", "gate", "--out", "g", "--seeds", "0,1", "--replicates", "7", "--margins", "0.05"]
    )
    assert (args.out, args.seeds, args.worse_seeds) == (Path("g"), (0, 1), (0, 1))
    assert (args.replicates, args.margins, args.check_decide) == (7, (0.05,), 20)
    defaults = _cssl_like_parser().parse_args(["bench", "gate", "--out", "g"])
    assert defaults.margins == MARGINS and defaults.worse_recipes == ("finetune", "finetune-lr10")
    chosen = ["bench", "gate", "--out", "g", "--worse-recipes", "finetune"]
    assert _cssl_like_parser().parse_args(chosen).worse_recipes == ("finetune",)
    with pytest.raises(SystemExit) as usage:
        _cssl_like_parser().parse_args(["bench", "gate"])
    assert usage.value.code == 2


def test_every_benchmark_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for name, *_ in cli.COMMANDS:
        assert cli.main([name, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks {name}")


def test_building_the_bench_parser_imports_no_heavy_module() -> None:
    code = (
        "import json, sys\n"
        "from benchmarks import cli\n"
        "cli.build_parser().parse_args(['train', '--steps', '2'])\n"
        "cli.build_parser().parse_args(['gate', '--out', 'x'])\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert json.loads(done.stdout) == []


def test_peers_without_lightly_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "lightly" else real(name)
    )
    assert cli.main(["peers"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bench peers needs lightly")
    assert "pip install -e '.[peers]'" in err[0]


def test_strategies_follow_the_options_and_set_overrides() -> None:
    from benchmarks.train import DEFAULT_STRATEGIES, strategies_to_measure
    from cssl_core.config import load_params

    defaults = load_params(None, [])
    assert strategies_to_measure(defaults, None, []) == DEFAULT_STRATEGIES
    finetune = load_params(None, ["train.strategy=finetune"])
    assert strategies_to_measure(finetune, None, ["train.strategy=finetune"]) == ("finetune",)
    assert strategies_to_measure(finetune, ["replay", "joint"], ["train.strategy=x"]) == (
        "replay",
        "joint",
    )


def test_configurations_are_the_trainers_unless_swept() -> None:
    from benchmarks.train import StepConfig, plan_configs
    from cssl_core.config import load_params

    params = load_params(None, ["train.num_threads=2"])
    assert plan_configs(params, sweep=False) == [StepConfig("auto", "auto", 2)]
    swept = plan_configs(params, sweep=True)
    assert len(swept) == 8 and StepConfig("bf16", "on", 1) in swept
    assert plan_configs(params, sweep=True, precisions=["fp32"], threads=[2]) == [
        StepConfig("fp32", "off", 2),
        StepConfig("fp32", "on", 2),
    ]


def test_cpu_kind_names_native_bf16_avx2_and_emulation() -> None:
    amx = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert cpu_kind(amx, {}) == "AVX512-BF16/AMX"
    assert cpu_kind({"avx2", "avx512_bf16"}, {}) == "AVX512-BF16"
    assert cpu_kind({"avx2", "fma"}, {}) == "AVX2-only"
    emulated = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    assert cpu_kind(amx, emulated) == "AVX2-only (emulated on AVX512-BF16/AMX)"
    assert cpu_kind({"avx2"}, emulated) == "AVX2-only"


def test_train_benchmark_measures_each_strategy_and_honours_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A tiny real run: both default strategies, one configuration, one timed step. The
    distill strategy's bare step runs the teacher too, so its FLOPs are larger: the strategy
    is really applied (it used to be ignored)."""
    argv = [*TINY_MODEL, "--batch-size", "8", "--steps", "1", "--warmup", "1", "--threads", "1"]
    argv += ["--precisions", "fp32", "--frames", "32", "--matmul-size", "128", "--json"]
    assert cli.main(["train", *argv]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["model"], result["input_size"], result["batch_size"]) == ("resnet10t", 32, 8)
    assert result["steps"] == 1 and not result["sweep"]
    by_name = {s["strategy"]: s for s in result["strategies"]}
    assert list(by_name) == ["finetune", "distill+replay"]
    for s in by_name.values():
        [row] = s["configs"]
        assert (row["precision"], row["threads"]) == ("fp32", 1)
        assert row["full_images_per_s"] == pytest.approx(8 / row["full_step_s"], rel=1e-12)
        assert s["ratio"] == row["full_images_per_s"] / row["bare_images_per_s"]
        assert s["goal_met"] == (s["ratio"] >= 0.85)
    ft, dr = by_name["finetune"], by_name["distill+replay"]
    assert not ft["configs"][0]["teacher"] and dr["configs"][0]["teacher"]
    # finetune's full step is the model step (augmentation counts no matmul/convolution);
    # distill+replay adds only the small predictor heads to its model step...
    assert ft["flops"]["full_per_step"] == pytest.approx(ft["flops"]["bare_per_step"], rel=0.01)
    extra = dr["flops"]["full_per_step"] - dr["flops"]["bare_per_step"]
    assert 0 <= extra < 0.05 * dr["flops"]["bare_per_step"]
    # ...and its model step holds two teacher forwards (about a third of fwd + bwd x 2 views).
    teacher_share = dr["flops"]["bare_per_step"] / ft["flops"]["bare_per_step"]
    assert 1.2 < teacher_share < 1.45
    assert set(result["matmul"]["peak_per_s"]) == {"fp32"}
    from benchmarks.train import format_train_benchmark

    lines = format_train_benchmark(result)
    assert any(line.startswith("finetune: full/bare ") for line in lines)
    assert any(line.startswith("distill+replay  ") and "fp32 contiguous" in line for line in lines)


def test_train_benchmark_honours_set_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY_MODEL, "--set", "train.strategy=finetune", "--batch-size", "8", "--steps", "1"]
    argv += ["--warmup", "1", "--threads", "1", "--precisions", "fp32", "--frames", "32"]
    assert cli.main(["train", *argv, "--matmul-size", "128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["strategy"] for s in result["strategies"]] == ["finetune"]


def test_peers_benchmark_runs_both_loops(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lightly")
    argv = [*TINY_MODEL, "--batch-size", "8", "--steps", "2", "--warmup", "1", "--rounds", "2"]
    argv += ["--set", "train.num_threads=1", "--frames", "16", "--json"]
    assert cli.main(["peers", *argv]) == 0
    result = json.loads(capsys.readouterr().out)
    lt, cs = result["lightly"], result["cssl"]
    assert len(lt["images_per_s"]) == len(cs["images_per_s"]) == 2
    assert all(r > 0 for r in [*lt["images_per_s"], *cs["images_per_s"]])
    assert cs["strategy"] == "finetune" and lt["precision"] == "fp32"
    assert result["machine"]["threads"] == 1
    assert result["ratio"] == pytest.approx(cs["mean_images_per_s"] / lt["mean_images_per_s"])
    from benchmarks.peers import format_peers_benchmark

    assert format_peers_benchmark(result)[-1].startswith("cssl / lightly: ")
