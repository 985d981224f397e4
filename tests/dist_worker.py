"""A torchrun worker for ``test_distributed.py``: ``torchrun ... dist_worker.py MODE OUT``.

``equivalence``: for each distillation loss, one step (loss and gradients after DDP's
all-reduce), then a 4-step period (weights); every rank writes its own results.
``kill``: a 6-step period with checkpoints every 2 steps in which rank 1 SIGKILLs itself
after step 3 on the first attempt; on the restarted attempt both ranks resume, finish, and
then train the same period again uninterrupted (no checkpoints) for comparison.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from dist_case import frames, grads, train_cfg, trainer, weights
from safetensors.torch import save_file

from cssl_core.learn import distributed as ddp

LOSSES = ("predictor", "nt_xent", "feature")


def equivalence(env: ddp.DistEnv, out: Path) -> None:
    new, old = frames()
    for loss in LOSSES:
        t = trainer(train_cfg(distill_loss=loss), env.rank, env.world_size)
        result = t.fit(new, old)
        save_file(grads(t.model), str(out / f"step-{loss}-rank{env.rank}.safetensors"))
        (out / f"step-{loss}-rank{env.rank}.json").write_text(
            json.dumps(result.history[0].__dict__)
        )
    t = trainer(train_cfg(steps=4), env.rank, env.world_size)
    result = t.fit(new, old)
    save_file(weights(t.model), str(out / f"period-rank{env.rank}.safetensors"))
    (out / f"period-rank{env.rank}.json").write_text(json.dumps([h.loss for h in result.history]))


def kill(env: ddp.DistEnv, out: Path) -> None:
    new, old = frames()

    def die(log, _rate) -> None:  # noqa: ANN001
        if env.rank == 1 and env.restart_count == 0 and log.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    t = trainer(
        train_cfg(steps=6),
        env.rank,
        env.world_size,
        checkpoint_dir=out / "ckpt",
        run_key="kill",
        on_step=die,
    )
    result = t.fit(new, old)
    again = trainer(train_cfg(steps=6), env.rank, env.world_size)
    again.fit(new, old)
    save_file(weights(t.model), str(out / f"resumed-rank{env.rank}.safetensors"))
    save_file(weights(again.model), str(out / f"whole-rank{env.rank}.safetensors"))
    info = {
        "resumed_from": result.resumed_from,
        "restart_count": env.restart_count,
        "steps_run": [h.step for h in result.history],
    }
    (out / f"kill-rank{env.rank}.json").write_text(json.dumps(info))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    env = ddp.env_from()
    ddp.init_process_group(env, torch.device("cpu"))
    try:
        {"equivalence": equivalence, "kill": kill}[mode](env, out)
    finally:
        ddp.destroy_process_group()


if __name__ == "__main__":
    main()
