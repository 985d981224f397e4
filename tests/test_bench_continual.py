"""The continual benchmark: a real smoke run on split CIFAR-10, the period datasets, the goals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks import continual as bc
from benchmarks import datasets as ds
from cssl_core.config import ConfigError, IngestConfig, SimulateConfig
from cssl_core.data.images import decode_image
from cssl_core.data.shard import eval_split_for
from cssl_core.evaluation.metrics import AccuracyMatrix

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


# -- the smoke run -----------------------------------------------------------------------


def _numbers(obj: Any, path: str = "") -> list[tuple[str, float]]:
    """Every int/float leaf of a JSON tree with its path (bools are not numbers here)."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _numbers(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in _numbers(v, f"{path}[{i}]")]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [(path, float(obj))]
    return []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], int]:
    """One real run through the command line: 2 strategies x 2 periods, 1 seed, smoke preset."""
    import torch

    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    argv = (
        "--dataset cifar10 --strategies distill+replay,joint --periods 2 --seeds 0 --preset smoke"
    )
    caps = ["--set", "bench.train_frames_per_period=48", "--set", "bench.eval_frames_per_period=24"]
    code = bc.main([*argv.split(), "--out", str(out), *caps])
    assert torch.get_num_threads() == threads  # the preset's num_threads is undone afterwards
    return out, json.loads((out / "results.json").read_text()), code


def test_smoke_run_writes_every_output(smoke: tuple[Path, dict[str, Any], int]) -> None:
    out, results, code = smoke
    assert code == 0
    for name in [
        "results.md",
        "average_accuracy.png",
        "matrix_distill-replay_knn.png",
        "matrix_distill-replay_linear.png",
        "matrix_joint_knn.png",
        "curves_joint_knn.png",
        "runs/joint_seed0.json",
    ]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "| strategy | final avg kNN | final avg linear | forgetting |" in md
    assert "| distill+replay |" in md and "| joint |" in md
    assert "### Each strategy with its 95% interval" in md
    own = results["intervals"]["joint"]["knn"]["avg_acc"]
    assert own["pooled"]["estimate"] == pytest.approx(
        results["summary"]["joint"]["avg_acc_knn"]["mean"]
    )
    assert "## Dataset: cifar10" in md
    assert results["dataset"]["periods"] == ["p01", "p02"]
    assert results["dataset"]["shards"]["p01"]["categories"] == {"airplane": 36, "automobile": 36}
    assert results["machine"]["cpu_cores"] >= 1 and results["machine"]["torch"]
    assert results["config"]["params"]["model"]["backbone"] == "resnet10t"


def test_combine_pools_runs_of_separate_invocations(
    smoke: tuple[Path, dict[str, Any], int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs split over two directories (one with results.json, one with run files only)
    pool back to the same summary, intervals, paired differences and goals."""
    import shutil

    out, results, _ = smoke
    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(out, first)
    (second / "runs").mkdir(parents=True)
    for f in (first / "runs").glob("distill-replay_seed0*"):
        shutil.move(f, second / "runs" / f.name)
    argv = ["--combine", str(first), str(second), "--out", str(tmp_path / "c")]
    assert bc.main(argv) == 0
    assert "distill+replay" in capsys.readouterr().out
    pooled = json.loads((tmp_path / "c" / "results.json").read_text())
    for key in ("summary", "intervals", "cell_intervals", "goals"):
        assert pooled[key] == results[key], key
    assert pooled["command"]["combined_from"] == [str(first), str(second)]
    assert "### Each strategy with its 95% interval" in (tmp_path / "c" / "results.md").read_text()
    with pytest.raises(bc.BenchError, match="no \\(strategy, seed\\) twice"):
        bc.combine([first, first], tmp_path / "d")
    with pytest.raises(bc.BenchError, match="needs a results.json"):
        bc.combine([second], tmp_path / "d")


def test_smoke_numbers_are_finite_and_in_range(smoke: tuple[Path, dict[str, Any], int]) -> None:
    _, results, _ = smoke
    numbers = _numbers(results)
    assert numbers and all(math.isfinite(v) for _, v in numbers)
    assert len(results["runs"]) == 2
    for run in results["runs"]:
        m = run["metrics"]
        for key in ("avg_acc_knn", "avg_acc_linear", "compat_new_vs_old", "compat_old_vs_old"):
            assert 0.0 <= m[key] <= 1.0, key
        for key in ("forgetting_knn", "forgetting_linear", "bwt_knn", "fwt_knn", "fwt_linear"):
            assert -1.0 <= m[key] <= 1.0, key
        assert m["train_wall_s"] > 0 and m["est_flops"] > 0
        for metric in ("knn", "linear"):
            R = AccuracyMatrix.from_dict(run["R"][metric])
            values = R.values
            assert not np.isnan(values).any()  # 2 periods: lower triangle + superdiagonal
            assert ((values >= 0) & (values <= 1)).all()
        for p in run["periods"]:
            assert p["flops_per_step"] > 0 and p["train_wall_s"] > 0
    for seed_scores in results["random_baseline"]["0"].values():
        assert all(0.0 <= v <= 1.0 for v in seed_scores.values())


def test_smoke_schedule_cost_and_shared_first_period(
    smoke: tuple[Path, dict[str, Any], int],
) -> None:
    _, results, _ = smoke
    runs = {r["strategy"]: r for r in results["runs"]}
    dr, joint = runs["distill+replay"], runs["joint"]
    # smoke: 2 steps per period; joint retrains on both periods with 2 x 2 steps.
    assert [p["steps"] for p in dr["periods"]] == [2, 2]
    assert [p["steps"] for p in joint["periods"]] == [2, 4]
    # the replay memory holds period 1's frames (capacity 64 >= 48) when period 2 trains
    assert [p["memory_frames"] for p in dr["periods"]] == [0, 48]
    # a joint step costs the same in every period; a distill step adds the teacher forward
    fj = [p["flops_per_step"] for p in joint["periods"]]
    fd = [p["flops_per_step"] for p in dr["periods"]]
    assert fj[0] == fj[1] == fd[0] and fd[1] > fd[0]
    assert joint["metrics"]["est_flops"] == pytest.approx(fj[0] * 6)
    assert dr["metrics"]["est_flops"] == pytest.approx(fd[0] * 2 + fd[1] * 2)
    # period 1 is strategy independent: trained once, the same first row for both
    assert dr["R"]["knn"]["R"][0] == joint["R"]["knn"]["R"][0]
    assert dr["metrics"]["compat_old_vs_old"] == joint["metrics"]["compat_old_vs_old"]
    goals = {g["goal"]: g for g in results["goals"]}
    assert goals["average accuracy (knn) >= finetune + 5 points"]["status"] == "not measured"
    compute = goals["cumulative compute <= 40% of joint's (est. FLOPs)"]
    assert compute["measured"] == pytest.approx(
        dr["metrics"]["est_flops"] / joint["metrics"]["est_flops"]
    )
    assert compute["status"] == ("pass" if compute["measured"] <= 0.4 else "miss")


# -- goals -------------------------------------------------------------------------------


def _summary(**values: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    return {s: {k: {"mean": v, "std": 0.0} for k, v in m.items()} for s, m in values.items()}


def test_goals_by_hand() -> None:
    summary = _summary(
        finetune={
            "avg_acc_knn": 0.60,
            "forgetting_knn": 0.20,
            "est_flops": 5.0,
            "train_wall_s": 50.0,
        },
        **{
            "distill+replay": {
                "avg_acc_knn": 0.66,
                "forgetting_knn": 0.10,
                "est_flops": 6.0,
                "train_wall_s": 55.0,
            }
        },
        joint={
            "avg_acc_knn": 0.70,
            "forgetting_knn": 0.0,
            "est_flops": 15.0,
            "train_wall_s": 150.0,
        },
    )
    goals = bc.check_goals(summary, "knn")
    status = [(g["status"], round(g["measured"], 6), round(g["target"], 6)) for g in goals]
    assert status == [
        ("pass", 0.66, 0.65),  # 0.66 >= 0.60 + 0.05
        ("pass", 0.10, 0.10),  # 0.10 <= 0.5 * 0.20 (equality passes)
        ("miss", 0.66, 0.67),  # 0.66 < 0.70 - 0.03
        ("pass", 0.4, 0.4),  # 6 / 15 = 0.4 <= 0.4
        ("pass", 0.366667, 0.4),  # 55 / 150 wall
    ]


def test_paired_accuracy_goal_needs_the_lower_bound_strictly_above_zero() -> None:
    summary = _summary(
        finetune={"avg_acc_knn": 0.6, "forgetting_knn": 0.2, "est_flops": 1, "train_wall_s": 1},
        **{
            "distill+replay": {
                "avg_acc_knn": 0.62,
                "forgetting_knn": 0.1,
                "est_flops": 1,
                "train_wall_s": 1,
            }
        },
    )

    def first(low: float) -> dict[str, Any]:
        iv = {"estimate": 0.02, "low": low, "high": 0.04}
        paired = {"distill+replay": {"knn": {"avg_acc": {"pooled": iv}}}}
        return bc.check_goals(summary, "knn", paired)[0]

    assert first(0.0)["status"] == "miss" and first(0.0)["comparison"] == ">"
    assert first(0.001)["status"] == "pass"


def test_a_goal_without_an_interval_is_not_measured() -> None:
    summary = _summary(
        finetune={"avg_acc_knn": 0.6, "forgetting_knn": 0.2, "est_flops": 1, "train_wall_s": 1},
        **{
            "distill+replay": {
                "avg_acc_knn": 0.62,
                "forgetting_knn": 0.1,
                "est_flops": 1,
                "train_wall_s": 1,
            }
        },
    )
    iv = {"estimate": 0.02, "low": None, "high": None}
    paired = {"distill+replay": {"knn": {"avg_acc": {"pooled": iv}, "next": {"pooled": iv}}}}
    goals = {g["goal"]: g for g in bc.check_goals(summary, "knn", paired)}
    lower = [g for name, g in goals.items() if "lower bound > 0" in name]
    assert lower and lower[0]["status"] == "not measured"
    assert [g["status"] for n, g in goals.items() if "next-period" in n] == ["not measured"]


def test_goals_not_measured_without_reference() -> None:
    summary = _summary(
        **{
            "distill+replay": {
                "avg_acc_knn": 0.5,
                "forgetting_knn": 0.1,
                "est_flops": 1.0,
                "train_wall_s": 1.0,
            }
        }
    )
    assert {g["status"] for g in bc.check_goals(summary, "knn")} == {"not measured"}


# -- configuration and command line ------------------------------------------------------


def test_presets_merge_and_overrides() -> None:
    tree, bench = bc.resolve_config(
        "smoke", None, ["train.steps=7", "bench.eval_frames_per_period=5"]
    )
    params = bc.params_for(tree, ["a", "b"])
    assert params.train.steps == 7 and params.model.backbone == "resnet10t"
    assert params.periods["b"].previous == "a"
    assert bench.eval_frames_per_period == 5 and bench.train_frames_per_period == 64
    for name in bc.PRESETS:  # every shipped preset validates
        bc.params_for(bc.resolve_config(name)[0], ["p01"])
    paper = bc.params_for(bc.resolve_config("paper")[0], ["p01"])
    assert paper.model.small_input_stem and paper.train.optimizer == "lars"
    assert paper.train.batch_size == 256 and paper.train.lr == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="bench.nope"):
        bc.resolve_config("smoke", None, ["bench.nope=1"])
    with pytest.raises(ConfigError, match="train.stepz"):
        bc.resolve_config("smoke", None, ["train.stepz=1"])


def test_main_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bc.main(["--dataset", "mnist", "--out", str(tmp_path)]) == 1
    assert "unknown dataset 'mnist'" in capsys.readouterr().err
    assert bc.main(["--dataset", "cifar10", "--strategies", "ewc", "--out", str(tmp_path)]) == 1
    assert "unknown strategies ['ewc']" in capsys.readouterr().err
    assert bc.main(["--dataset", "cifar10"]) == 2  # --out missing: usage error
    assert (
        bc.main(
            ["--dataset", "cifar10", "--out", str(tmp_path), "--periods", "6", "--preset", "smoke"]
        )
        == 1
    )
    assert "--periods 6: this dataset has 5 periods" in capsys.readouterr().err
    assert bc.main(["--out", str(tmp_path)]) == 1
    assert "--dataset is required" in capsys.readouterr().err


# -- datasets ----------------------------------------------------------------------------


def test_cifar10_class_incremental_periods_hold_their_two_classes(tmp_path: Path) -> None:
    data = ds.build_cifar10(tmp_path, train_cap=20, eval_cap=10)
    assert data.periods == ["p01", "p02", "p03", "p04", "p05"]
    for k, shard in enumerate(data.shards):
        pair = CIFAR_CLASSES[2 * k : 2 * k + 2]
        assert shard.manifest["categories"] == {pair[0]: 15, pair[1]: 15}
        assert shard.manifest["splits"] == {"eval": 10, "train": 20}
        sources = shard.read(["source", "split"]).to_pylist()
        assert {
            r["source"].split(":")[1].split("/")[0] for r in sources if r["split"] == "eval"
        } == {"test"}
        streams = shard.read(["stream_id"]).column("stream_id").to_pylist()
        assert len(set(streams)) == len(streams) == 30  # each image its own bootstrap unit
    again = ds.build_cifar10(tmp_path, train_cap=20, eval_cap=10)  # deterministic
    assert [s.fingerprint for s in again.shards] == [s.fingerprint for s in data.shards]
    ordered = ds.build_cifar10(tmp_path / "o", period_order=["p03", "p01"], train_cap=4, eval_cap=2)
    assert ordered.periods == ["p03", "p01"]
    assert set(ordered.shards[0].manifest["categories"]) == {"deer", "dog"}


def test_cifar10_drift_mixes_differ_between_periods(tmp_path: Path) -> None:
    mixes = ds.drift_mixes(5, 10)
    assert np.allclose(mixes.sum(axis=1), 1.0)
    assert mixes.argmax(axis=1).tolist() == [0, 2, 4, 6, 8]
    data = ds.build_cifar10(tmp_path, drift=True, train_cap=400, eval_cap=100)
    shares = []
    for shard in data.shards:
        cats = shard.manifest["categories"]
        assert sorted(cats) == sorted(CIFAR_CLASSES)  # every class in every period
        assert shard.manifest["splits"] == {"eval": 100, "train": 400}
        total = sum(cats.values())
        shares.append(np.array([cats[c] / total for c in CIFAR_CLASSES]))
    for i in range(5):
        for j in range(i + 1, 5):
            assert np.abs(shares[i] - shares[j]).sum() > 0.3, (i, j)
    ids = [set(s.read(["frame_id"]).column("frame_id").to_pylist()) for s in data.shards]
    assert sum(len(x) for x in ids) == len(set().union(*ids))  # no frame in two periods


def test_deal_by_mix_partitions_each_class() -> None:
    labels = np.repeat(np.arange(3), [10, 7, 5])
    mixes = ds.drift_mixes(4, 3)
    parts = ds.deal_by_mix(labels, mixes, np.random.default_rng(0))
    joined = np.sort(np.concatenate(parts))
    assert joined.tolist() == list(range(22))
    assert ds.largest_remainder(np.array([1.0, 1.0, 1.0]), 10).tolist() == [4, 3, 3]


def _image_folder(root: Path, layout: dict[str, dict[str, list[bytes]]]) -> None:
    for period, cats in layout.items():
        for cat, images in cats.items():
            (root / period / cat).mkdir(parents=True)
            for k, data in enumerate(images):
                (root / period / cat / f"{k:03d}.jpg").write_bytes(data)


def test_folder_dataset_reads_layout_and_order(tmp_path: Path, cifar_jpegs: list[bytes]) -> None:
    src = tmp_path / "mine"
    _image_folder(
        src,
        {
            "2024-02": {"chess": cifar_jpegs[0:10], "poker": cifar_jpegs[10:16]},
            "2024-01": {"chess": cifar_jpegs[16:30]},
            "2024-03": {"poker": cifar_jpegs[30:38], "golf": cifar_jpegs[38:40]},
        },
    )
    cfg = IngestConfig(eval_fraction=0.3)
    spec = ds.parse_dataset(f"folder:{src}")
    assert spec.kind == "folder" and spec.path == src
    data = ds.build_dataset(spec, tmp_path / "w", simulate=SimulateConfig(), ingest_cfg=cfg)
    assert data.periods == ["2024-01", "2024-02", "2024-03"]
    assert data.shards[1].manifest["categories"] == {"chess": 10, "poker": 6}
    assert data.shards[2].manifest["categories"] == {"golf": 2, "poker": 8}
    rows = data.shards[0].read(["frame_id", "split"]).to_pylist()
    assert [r["split"] for r in rows] == [eval_split_for(r["frame_id"], 0.3) for r in rows]
    ordered = ds.build_dataset(
        spec,
        tmp_path / "w2",
        simulate=SimulateConfig(),
        ingest_cfg=cfg,
        period_order=["2024-03", "2024-01"],
    )
    assert ordered.periods == ["2024-03", "2024-01"]
    with pytest.raises(ds.DatasetError, match="unknown periods"):
        ds.build_dataset(
            spec,
            tmp_path / "w3",
            simulate=SimulateConfig(),
            ingest_cfg=cfg,
            period_order=["2024-09"],
        )


def test_torchvision_cifar_folder_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    pixels = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    pixels[1, :, :, 0] = 255

    class FakeCIFAR10:  # torchvision's attributes: data (N, 32, 32, 3), targets, classes
        def __init__(self, root: str, train: bool, download: bool) -> None:
            assert not download and Path(root) == tmp_path
            self.data = pixels if train else pixels[:2]
            self.targets = [0, 1, 1, 0] if train else [1, 0]
            self.classes = CIFAR_CLASSES

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    (tmp_path / ds.CIFAR10_BATCHES).mkdir()
    data = ds.load_cifar10(tmp_path / ds.CIFAR10_BATCHES)
    assert data.labels["train"].tolist() == [0, 1, 1, 0]
    assert data.labels["test"].tolist() == [1, 0]
    red = np.asarray(decode_image(data.image("train", 1)))
    assert red[..., 0].mean() > 240 and red[..., 1].mean() < 15
    with pytest.raises(ds.DatasetError, match="CSSL_CIFAR10"):
        ds.load_cifar10(tmp_path / "nowhere")


# -- where CIFAR-10 comes from -----------------------------------------------------------


@pytest.fixture
def no_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No $CSSL_CIFAR10, no shared copy, an empty per-user cache under ``tmp_path``."""
    monkeypatch.delenv(ds.CIFAR10_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ds, "shared_cifar10_path", lambda: tmp_path / "shared" / ds.CIFAR10_FILE)
    return tmp_path


def _fake_torchvision(monkeypatch: pytest.MonkeyPatch, fail: Exception | None = None) -> list:
    """torchvision's CIFAR10 replaced by 6 train and 3 test images of 3 classes (no network);
    ``download=True`` "fetches" (or raises ``fail``). Returns the calls it saw."""
    import torchvision.datasets

    calls: list[tuple[bool, bool]] = []
    pixels = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    for i in range(6):
        pixels[i, :, :, i % 3] = 40 * (i + 1)

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((train, download))
            if download and fail is not None:
                raise fail
            self.data = pixels if train else pixels[:3]
            self.targets = [2, 0, 1, 0, 2, 0] if train else [1, 2, 0]
            self.classes = CIFAR_CLASSES[:3]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    return calls


def test_cifar10_resolution_order(no_cifar: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = no_cifar / "cache" / "cssl" / ds.CIFAR10_FILE
    assert ds.cifar10_cache_path() == cache
    assert ds.default_cifar10_source() == cache  # nothing anywhere: where the download goes
    shared = no_cifar / "shared" / ds.CIFAR10_FILE
    shared.parent.mkdir()
    shared.write_bytes(b"x")
    assert ds.default_cifar10_source() == shared  # the shared copy beats the cache
    assert ds.ensure_cifar10() == shared
    own = no_cifar / "mine.parquet"
    monkeypatch.setenv(ds.CIFAR10_ENV, str(own))
    assert ds.default_cifar10_source() == own  # $CSSL_CIFAR10 beats both...
    with pytest.raises(ds.DatasetError, match=r"\$CSSL_CIFAR10 is .*mine.parquet, which does not"):
        ds.ensure_cifar10()  # ...and is never silently replaced by another copy
    monkeypatch.delenv(ds.CIFAR10_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert ds.cifar10_cache_path() == Path.home() / ".cache" / "cssl" / ds.CIFAR10_FILE


def test_cifar10_is_downloaded_once_and_converted(
    no_cifar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_torchvision(monkeypatch)
    path = ds.ensure_cifar10()
    assert path == ds.cifar10_cache_path() and path.is_file()
    assert calls[:2] == [(True, True), (False, True)]  # fetched with torchvision, both splits
    assert not (path.parent / "cifar10-download").exists()  # the raw download is removed
    table = pq.read_table(path)
    assert table.schema.names == ["image", "label", "label_name", "split", "source_path"]
    assert str(table.schema.field("label").type) == "int16"
    rows = table.drop(["image"]).to_pylist()
    assert [r["source_path"] for r in rows] == [
        "train/airplane/0000.jpg",
        "train/airplane/0001.jpg",
        "train/airplane/0002.jpg",
        "train/automobile/0000.jpg",
        "train/bird/0000.jpg",
        "train/bird/0001.jpg",
        "test/airplane/0000.jpg",
        "test/automobile/0000.jpg",
        "test/bird/0000.jpg",
    ]
    assert [r["label"] for r in rows] == [0, 0, 0, 1, 2, 2, 0, 1, 2]
    # train/bird/0001 is the 5th train image (index 4): channel 1 at 200.
    bird = np.asarray(decode_image(table.column("image")[5].as_py()))
    assert abs(bird[..., 1].mean() - 200) < 3 and bird[..., 0].mean() < 3
    data = ds.load_cifar10()  # the benchmark reads the converted file
    assert data.classes == CIFAR_CLASSES[:3] and data.labels["test"].tolist() == [0, 1, 2]
    calls.clear()
    assert ds.ensure_cifar10() == path and calls == []  # found in the cache: no second fetch


def test_cifar10_offline_and_absent_is_one_clear_line(
    no_cifar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error

    _fake_torchvision(monkeypatch, fail=urllib.error.URLError("[Errno -3] name resolution"))
    with pytest.raises(ds.DatasetError) as info:
        ds.ensure_cifar10()
    message = str(info.value)
    assert "\n" not in message and "downloading it failed (URLError" in message
    assert "set CSSL_CIFAR10 to a cifar10-jpeg.parquet" in message
    assert not ds.cifar10_cache_path().exists()  # no half-written file left behind
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", "tests"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "CSSL_CIFAR10": str(no_cifar / "missing.parquet"),
        },
    )
    assert done.returncode != 0
    [line] = [x for x in done.stderr.splitlines() if "CIFAR-10" in x]
    assert "the tests read real CIFAR-10 JPEGs: $CSSL_CIFAR10 is" in line


def test_domain_folders_are_a_folder_dataset_with_one_cluster_per_image(tmp_path: Path) -> None:
    """The domain-incremental CIFAR-10 sequence reads back through ``folder:`` with every class
    in every period, disjoint images, each image its own stream (the bootstrap's unit)."""
    import numpy as np
    from PIL import Image

    from benchmarks.domain_folders import DOMAINS, main, write_domain_folders

    names = write_domain_folders(tmp_path / "dom", per_class=2, seed=1)
    assert names == ds.period_names(len(DOMAINS))
    cfg = IngestConfig(eval_fraction=0.5, dedup_max_distance=0)
    spec = ds.parse_dataset(f"folder:{tmp_path / 'dom'}")
    data = ds.build_dataset(spec, tmp_path / "w", simulate=SimulateConfig(), ingest_cfg=cfg)
    assert data.periods == names
    sources: list[str] = []
    for shard in data.shards:
        assert sorted(shard.manifest["categories"].values()) == [2] * 10
        rows = shard.read(["stream_id", "source"]).to_pylist()
        assert len({r["stream_id"] for r in rows}) == len(rows) == 20
        sources += [Path(r["source"]).name for r in rows]
    assert len(set(sources)) == len(sources)  # no CIFAR-10 image in two periods
    gray = next((tmp_path / "dom" / names[2]).rglob("*.png"))
    rgb = np.asarray(Image.open(gray).convert("RGB"))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert main(["--out", str(tmp_path / "bad"), "--per-class", "0"]) == 1


# -- intervals and paired differences on runs built by hand --------------------------------


def _hand_run(strategy: str, seed: int, correct: dict[tuple[str, str], list[bool]]) -> bc.Run:
    """A run over p01, p02 whose R cells are the accuracies of the given per-frame results
    (one frame per cluster, the stream's one-frame eval clips)."""
    from cssl_core.evaluation.outcomes import FrameOutcomes

    periods = ["p01", "p02"]
    R = {m: AccuracyMatrix(periods) for m in bc.METRICS}
    run = bc.Run(strategy, seed, R, compatibility={"new_vs_old": 0.5, "old_vs_old": 0.5})
    for (row, col), hits in correct.items():
        arr = np.asarray(hits, dtype=bool)
        ids = tuple(f"{col}-{k}" for k in range(arr.size))
        run.outcomes[(row, col)] = FrameOutcomes(ids, ids, ("g",) * arr.size, arr, arr)
        for m in bc.METRICS:
            R[m].set(row, col, float(arr.mean()))
    run.periods = [
        bc.PeriodRecord(
            p, 3, 1.0, 1.0, 1.0, 10.0, 0.5, 1e9 * (1 + (strategy != "finetune")), 0, 0.1
        )
        for p in periods
    ]
    return run


def _cells(p11: int, p12: int, p21: int, p22: int, n: int = 10) -> dict:
    """Cells with the given number of hits out of ``n`` frames each."""
    hits = {("p01", "p01"): p11, ("p01", "p02"): p12, ("p02", "p01"): p21, ("p02", "p02"): p22}
    return {cell: [k < h for k in range(n)] for cell, h in hits.items()}


def test_strategy_intervals_and_paired_differences_by_hand() -> None:
    runs = [
        _hand_run("finetune", 0, _cells(8, 4, 5, 7)),
        _hand_run("finetune", 1, _cells(8, 3, 6, 9)),
        _hand_run("distill+replay", 0, _cells(8, 4, 7, 7)),
        _hand_run("distill+replay", 1, _cells(8, 3, 8, 8)),
    ]
    ivs = bc.strategy_intervals(runs, ["finetune", "distill+replay"], n_resamples=200)
    ft, dr = ivs["finetune"]["knn"], ivs["distill+replay"]["knn"]
    # average accuracy: mean over seeds of the final row's mean, (0.5+0.7)/2 and (0.6+0.9)/2
    assert ft["avg_acc"]["pooled"]["estimate"] == pytest.approx((0.6 + 0.75) / 2)
    assert ft["avg_acc"]["per_seed"]["values"] == pytest.approx([0.6, 0.75])
    # forgetting: best earlier p01 (0.8) minus the final row's p01 (0.5, 0.6)
    assert ft["forgetting"]["pooled"]["estimate"] == pytest.approx((0.3 + 0.2) / 2)
    assert dr["forgetting"]["pooled"]["estimate"] == pytest.approx((0.1 + 0.0) / 2)
    # next-period: R[p01][p02] = 0.4 and 0.3
    assert ft["next"]["pooled"]["estimate"] == pytest.approx(0.35)
    for entry in (ft["avg_acc"], ft["forgetting"], dr["next"]):
        iv = entry["pooled"]
        assert iv["low"] <= iv["estimate"] <= iv["high"] and iv["n_clusters"] > 0
    diff = bc.paired_comparisons(runs, ["finetune", "distill+replay"], n_resamples=200)
    d = diff["distill+replay"]["knn"]
    assert d["avg_acc"]["pooled"]["estimate"] == pytest.approx(
        dr["avg_acc"]["pooled"]["estimate"] - ft["avg_acc"]["pooled"]["estimate"]
    )
    assert d["avg_acc"]["per_seed"]["values"] == pytest.approx([0.1, 0.05])
    assert d["forgetting"]["pooled"]["estimate"] == pytest.approx(-0.2)
    assert d["next"]["pooled"]["estimate"] == pytest.approx(0.0)
    assert diff["distill+replay"]["compute"]["est_flops"]["mean"] == pytest.approx(2.0)
    one_seed = [*runs, _hand_run("joint", 1, _cells(9, 5, 9, 9))]
    joint = bc.paired_comparisons(one_seed, ["finetune", "joint"], n_resamples=200)["joint"]
    assert joint["knn"]["avg_acc"]["per_seed"]["values"] == pytest.approx([0.15])
    same = bc.stratified_difference([(np.ones(4, bool), np.ones(4, bool), np.arange(4))])
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)


def test_a_run_reads_back_from_its_files(tmp_path: Path) -> None:
    run = _hand_run("distill+replay", 1, _cells(8, 4, 7, 7))
    stem = tmp_path / "runs" / "distill-replay_seed1"
    bc._write_json(
        stem.with_suffix(".json"),
        run.to_dict({p: {"knn": 0.25, "linear": 0.25} for p in ("p01", "p02")}),
    )
    bc.write_outcomes(stem.with_name(stem.name + "_outcomes.parquet"), run)
    back = bc.load_run(stem.with_suffix(".json"))
    assert (back.strategy, back.seed) == ("distill+replay", 1)
    assert back.R["knn"].to_dict() == run.R["knn"].to_dict()
    assert back.periods == run.periods and back.compatibility == run.compatibility
    assert back.outcomes.keys() == run.outcomes.keys()
    for cell, frames in run.outcomes.items():
        assert back.outcomes[cell].frame_ids == frames.frame_ids
        assert (back.outcomes[cell].knn == frames.knn).all()
    (tmp_path / "bad.json").write_text('{"x": 1}')
    with pytest.raises(bc.BenchError, match="not a run file"):
        bc.load_run(tmp_path / "bad.json")


def test_stream_periods_are_reused_only_for_the_same_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cssl_core.data.simulate as sim

    cfg = SimulateConfig(frames_per_period=24, size=32, eval_fraction=0.25)
    first = ds.build_stream(tmp_path, cfg, num_periods=2)
    fingerprints = [s.fingerprint for s in first.shards]

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("simulated again")

    monkeypatch.setattr(sim, "simulate_period", refuse)
    again = ds.build_stream(tmp_path, cfg, num_periods=2)
    assert [s.fingerprint for s in again.shards] == fingerprints
    with pytest.raises(AssertionError, match="simulated again"):
        ds.build_stream(tmp_path, cfg.model_copy(update={"seed": 1}), num_periods=2)
    with pytest.raises(AssertionError, match="simulated again"):
        ds.build_stream(tmp_path, cfg, num_periods=3)  # p01 of a 3-period stream differs
