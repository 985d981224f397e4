"""One period's training as its own process, for the kill -9 tests.

    python train_driver.py PARAMS_FILE SHARD_DIR CHECKPOINT_DIR OUT_FILE [OVERRIDE ...]

Trains the first period of PARAMS_FILE (plus overrides) on SHARD_DIR with checkpoints in
CHECKPOINT_DIR (resuming from the newest one of the same run), prints ``step N`` after every
step and writes ``resumed_from weights_sha256`` to OUT_FILE at the end. The code path is the
refresh flow's: ``cssl_core.period.train_period`` (the training of ``run_period``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cssl_core import period as core
from cssl_core.config import load_params
from cssl_core.data.shard import Shard
from cssl_core.memory.replay import ReplayMemory


def main(argv: list[str]) -> int:
    params_file, shard_dir, ckpt_dir, out_file, *overrides = argv
    params = load_params(params_file, overrides)
    shard = Shard.open(shard_dir)
    inputs = core.PeriodInputs(
        params=params,
        period=shard.period,
        shard=shard,
        memory=ReplayMemory.empty(params.replay.capacity),
        checkpoint_dir=Path(ckpt_dir),
    )
    model, result = core.train_period(
        inputs, on_step=lambda log, _: print(f"step {log.step + 1}", flush=True)
    )
    Path(out_file).write_text(f"{result.resumed_from} {model.state_fingerprint()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
