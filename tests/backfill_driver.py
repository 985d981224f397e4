"""A backfill as its own process, for the kill -9 test.

    python backfill_driver.py INDEX_DIR MODEL_DIR VERSION CHUNK_SIZE DELAY_S SHARD_DIR...

Runs :func:`pipelines.backfill.run_backfill` (the code path of ``cssl backfill``), prints
``committed CHUNK DONE`` after every chunk commit and then sleeps DELAY_S (so a test can kill it
between or inside chunks), and prints ``report CHUNKS_RUN SWITCHED`` at the end.
"""

from __future__ import annotations

import sys
import time

from pipelines.backfill import run_backfill


def main(argv: list[str]) -> int:
    index_dir, model_dir, version, chunk_size, delay, *shards = argv

    def on_commit(chunk: int, done: int) -> None:
        print(f"committed {chunk} {done}", flush=True)
        time.sleep(float(delay))

    report = run_backfill(
        index_dir,
        shards,
        model_dir,
        int(version),
        chunk_size=int(chunk_size),
        waves=4,
        on_commit=on_commit,
    )
    print(f"report {report.chunks_run} {report.switched}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
