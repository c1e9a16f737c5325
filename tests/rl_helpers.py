"""Shared pieces of the scale-out tests: tiny runs in-process, or as a script launched by the tests.

Used in-process by tests/test_resume.py, tests/test_precision.py and tests/test_distributed.py, and as a
script (``python tests/rl_helpers.py --strategy ddp --devices 2 ...``) for multi-process runs: Lightning's
``ddp`` / ``ModelParallelStrategy`` launchers start the other ranks by running this file again.

:class:`DeterministicRollout` makes a run independent of sampling randomness (which differs between 1 and 2
processes): each completion is a fixed function of its prompt and its index in the group, and its behaviour
log-probs are the policy's own teacher-forced log-probs (plus a fixed offset), computed like a real engine
would (a forward pass of the current policy).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from drpo_lightning.data import PromptDataModule
from drpo_lightning.module import RLModule
from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.rewards.base import RewardFunction
from drpo_lightning.rollouts.base import RolloutEngine
from drpo_lightning.rollouts.hf import HFRollout
from drpo_lightning.tiny import build_char_tokenizer, build_tiny_model
from drpo_lightning.types import RolloutBatch

FIRST_DIGIT_ID = 4  # build_char_tokenizer: <pad> <bos> <eos> <unk> then "0".."9"
EOS_ID = 2
PAD_ID = 0


def make_tiny_model(path: str | os.PathLike[str], arch: str = "llama", seed: int = 0, hidden_size: int = 32) -> str:
    """A 2-layer character-tokenizer model saved like any local model folder; returns its path."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(arch, tokenizer, hidden_size=hidden_size, num_layers=2, num_heads=2, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class DeterministicRollout(RolloutEngine):
    """Completions that depend only on the prompt and the group index; mu = the policy's log-probs - 0.05."""

    def __init__(self, max_new_tokens: int = 4) -> None:
        self.max_new_tokens = max_new_tokens
        self.temperature = 1.0

    @torch.no_grad()
    def generate(self, policy, prompt_ids, prompt_mask, *, num_generations, eos_token_id, pad_token_id, topk=0):
        from drpo_lightning.logprobs import policy_token_stats

        G, T = num_generations, self.max_new_tokens
        B = prompt_ids.shape[0]
        seeds = (prompt_ids * prompt_mask).sum(-1)  # [B]
        rows, masks = [], []
        for b in range(B):
            s = int(seeds[b])
            for g in range(G):
                length = 1 + (s + g) % (T - 1)  # digits before EOS: 1 .. T-1
                ids = [FIRST_DIGIT_ID + (s * 7 + g * 3 + j * 5) % 10 for j in range(length)] + [EOS_ID]
                ids += [PAD_ID] * (T - len(ids))
                rows.append(ids)
                masks.append([1.0] * (length + 1) + [0.0] * (T - length - 1))
        completion = torch.tensor(rows, device=prompt_ids.device)
        mask = torch.tensor(masks, device=prompt_ids.device)
        p_ids = prompt_ids.repeat_interleave(G, 0)
        p_mask = prompt_mask.repeat_interleave(G, 0)
        was_training = policy.training
        policy.eval()
        stats = policy_token_stats(
            policy, torch.cat([p_ids, completion], 1), torch.cat([p_mask, mask.long()], 1), p_ids.shape[1]
        )
        policy.train(was_training)
        behaviour = (stats.logprobs.float() - 0.05) * mask
        return RolloutBatch(
            prompt_ids=p_ids,
            prompt_mask=p_mask,
            completion_ids=completion,
            completion_mask=mask,
            behavior_logprobs=behaviour,
            truncated=torch.zeros(B * G, dtype=torch.bool, device=prompt_ids.device),
            group_ids=torch.arange(B, device=prompt_ids.device).repeat_interleave(G),
        )


class CountOnes(RewardFunction):
    """Fraction of completion characters that are '1': varies from the first step, learnable in a few."""

    def __call__(self, *, prompts, completions, **columns):
        return [sum(c == "1" for c in text) / 4.0 for text in completions]


class DigitReward(RewardFunction):
    """Mean digit of the completion / 9: deterministic and different within a group."""

    def __call__(self, *, prompts, completions, **columns):
        out = []
        for text in completions:
            digits = [int(c) for c in text if c.isdigit()]
            out.append(sum(digits) / (9.0 * len(digits)) if digits else 0.0)
        return out


class MetricRecorder(pl.Callback):
    """Per-step ``callback_metrics`` (timings left out) on rank 0."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            self.steps.append({
                k: float(v) for k, v in trainer.callback_metrics.items()
                if not k.startswith("perf/") and k.startswith(("train/", "reward", "advantage/", "completion/"))
            })


class SigtermAfter(pl.Callback):
    """Prints a marker after step ``step`` and slows every later step so the test can send SIGTERM."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and trainer.is_global_zero:
            print(f"STEP-DONE {trainer.global_step}", flush=True)
            time.sleep(0.5)


def build(args: argparse.Namespace, model_dir: str) -> tuple[RLModule, PromptDataModule]:
    if args.engine == "deterministic":
        rollout = DeterministicRollout(max_new_tokens=4)
    else:
        rollout = HFRollout(max_new_tokens=4, precision=args.rollout_precision)
    scheduler = None
    if args.scheduler:
        def scheduler(opt):
            return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    module = RLModule(
        model_name_or_path=model_dir,
        objective=DRPO(delta=0.2),
        rollout=rollout,
        rewards=[DigitReward()],
        num_generations=4,
        ppo_epochs=args.ppo_epochs,
        num_minibatches=args.num_minibatches,
        micro_batch_size=args.micro_batch_size,
        export_dir=args.export_dir if args.export_dir is not None else "",
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr),
        lr_scheduler=scheduler,
    )
    data = PromptDataModule(
        task="arithmetic", task_size=args.num_prompts, val_size=4 if args.val_every else 0,
        batch_size=args.batch_size, val_batch_size=4, seed=0,
    )
    return module, data


def make_trainer(args: argparse.Namespace, callbacks: list[pl.Callback], plugins=None) -> pl.Trainer:
    strategy: object = "auto"
    accelerator = "cpu"
    if args.strategy == "ddp":
        strategy = "ddp"
    elif args.strategy == "fsdp":  # FSDP1: GPUs only
        from lightning.pytorch.strategies import FSDPStrategy

        from drpo_lightning.distributed import DecoderLayerPolicy

        accelerator = "gpu"
        strategy = FSDPStrategy(auto_wrap_policy=DecoderLayerPolicy(),
                                activation_checkpointing_policy=DecoderLayerPolicy(include_model=False))
    elif args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    return pl.Trainer(
        accelerator=accelerator, devices=args.devices, strategy=strategy, precision=args.precision,
        max_steps=args.steps, logger=False, enable_checkpointing=any(
            isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1 if args.val_every else 0,
        val_check_interval=args.val_every or None, check_val_every_n_epoch=None if args.val_every else 1,
        callbacks=callbacks, default_root_dir=args.out, plugins=plugins,
    )


def policy_params(module: RLModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in module.policy.state_dict().items()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="single", choices=["single", "ddp", "fsdp2", "fsdp"])
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--rollout-precision", default=None)
    p.add_argument("--engine", default="deterministic", choices=["deterministic", "hf"])
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--num-minibatches", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--scheduler", action="store_true")
    p.add_argument("--val-every", type=int, default=0)
    p.add_argument("--export-dir", default=None)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--ckpt-path", default=None)
    p.add_argument("--sigterm-after", type=int, default=0)
    p.add_argument("--block-publish-at", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    return p


class BlockingCheckpoint:
    """Factory of an RLCheckpoint that blocks forever before publishing the checkpoint of step ``step``."""

    @staticmethod
    def make(step: int, **kwargs):
        from drpo_lightning.checkpoint import RLCheckpoint

        class Blocking(RLCheckpoint):
            def _before_publish(self, staging, final):
                if self._blocking_step == step:
                    print(f"BLOCKED {final.name}", flush=True)
                    time.sleep(600)

            def _save_checkpoint(self, trainer, filepath):
                self._blocking_step = trainer.global_step
                super()._save_checkpoint(trainer, filepath)

        return Blocking(**kwargs)


def run(args: argparse.Namespace) -> dict:
    """One fit; returns (and on rank 0 writes to ``args.out``) the per-step metrics and final parameters."""
    pl.seed_everything(args.seed, verbose=False)
    module, data = build(args, args.model_dir)
    recorder = MetricRecorder()
    callbacks: list[pl.Callback] = [recorder]
    plugins = None
    if args.ckpt_dir:
        from drpo_lightning.checkpoint import AtomicCheckpointIO, RLCheckpoint

        kwargs = dict(dirpath=args.ckpt_dir, every_n_train_steps=args.ckpt_every or None, save_last=True,
                      save_top_k=-1)
        if args.block_publish_at:
            callbacks.append(BlockingCheckpoint.make(args.block_publish_at, **kwargs))
        else:
            callbacks.append(RLCheckpoint(**kwargs))
        plugins = [AtomicCheckpointIO()] if args.strategy not in ("fsdp", "fsdp2") else None
    if args.sigterm_after:
        callbacks.append(SigtermAfter(args.sigterm_after))
    trainer = make_trainer(args, callbacks, plugins)
    trainer.fit(module, datamodule=data, ckpt_path=args.ckpt_path, weights_only=True if args.ckpt_path else None)
    result = {"metrics": recorder.steps, "global_step": trainer.global_step}
    if args.strategy not in ("fsdp", "fsdp2"):
        result["params"] = policy_params(module)
    if trainer.is_global_zero:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result["metrics"]))
        if "params" in result:
            torch.save(result["params"], out / "params.pt")
        (out / "done").write_text(str(trainer.global_step))
    return result


def namespace(**overrides) -> argparse.Namespace:
    """The script's defaults with ``overrides`` (keyword names use underscores)."""
    args = parser().parse_args(["--model-dir", str(overrides.pop("model_dir")), "--out", str(overrides.pop("out"))])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise AttributeError(key)
        setattr(args, key, value)
    return args


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    run(parser().parse_args(sys.argv[1:]))
