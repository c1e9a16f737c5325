"""A short training run to be killed: ``python tests/reliability/rel_kill_run.py --model-dir M --out O --steps N``.

The run of ``tests/rl_helpers.py`` (deterministic rollout, DRPO, a checkpoint every step plus ``last``, atomic
writes, resume with ``ckpt_path="last"`` and ``weights_only=True``) with two additions for the kill -9 test:

- ``STEP <global_step>`` is printed after every optimizer step, so the test knows training is under way;
- every save lingers a little between writing the bytes and moving them into place (a slow disk), so a
  random kill often lands in the middle of a save, the moment that could leave a torn checkpoint.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for rl_helpers

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from rl_helpers import build, make_trainer, parser, policy_params  # noqa: E402

from drpo_lightning.checkpoint import AtomicCheckpointIO, RLCheckpoint  # noqa: E402

SAVE_LINGER_S = 0.03


class SlowCheckpointIO(AtomicCheckpointIO):
    def _before_commit(self, partial, target):
        time.sleep(SAVE_LINGER_S)


class SlowRLCheckpoint(RLCheckpoint):
    def _before_publish(self, staging, final):
        time.sleep(SAVE_LINGER_S)


class StepMarker(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(f"STEP {trainer.global_step}", flush=True)


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    module, data = build(args, args.model_dir)
    checkpoint = SlowRLCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=1, save_last=True, save_top_k=-1)
    trainer = make_trainer(args, [StepMarker(), checkpoint], plugins=[SlowCheckpointIO()])
    trainer.fit(module, datamodule=data, ckpt_path="last", weights_only=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(policy_params(module), out / "params.pt")
    (out / "done").write_text(json.dumps({"global_step": trainer.global_step}))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    main(sys.argv[1:])
