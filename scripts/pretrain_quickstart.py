#!/usr/bin/env python
"""Supervised warm-up of the quickstart policy on ``a+b=`` (a, b uniform in [0, 100)).

Trains a ~1M-parameter Llama with the character tokenizer of :mod:`drpo_lightning.tiny` on
``f"{a}+{b}={a + b}" + eos`` for training pairs only (``not is_heldout(a, b)``), with the loss on the answer
tokens and EOS (prompt tokens masked). Every ``--eval-every`` steps it measures held-out accuracy on the
full held-out split (500 pairs), greedy and sampled at temperature 1 (the RL setting), and stops as soon as
the *sampled* accuracy reaches ``--target-accuracy``: the result has some skill and plenty of room for RL.

Saves the model (safetensors), tokenizer and ``pretrain_info.json`` to ``--out``
(default: ``drpo_lightning/assets/quickstart_policy``). Deterministic for a given seed and thread count.

    python scripts/pretrain_quickstart.py --target-accuracy 0.25 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from drpo_lightning.tiny import (
    QUICKSTART_POLICY,
    build_char_tokenizer,
    build_tiny_llama,
    heldout_pairs,
    train_pairs,
)


def encode_examples(tokenizer, pairs):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
    rows, labels = [], []
    for a, b in pairs:
        prompt = tokenizer(f"{a}+{b}=", add_special_tokens=False)["input_ids"]
        answer = tokenizer(str(a + b), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return ids, mask, lab


@torch.no_grad()
def evaluate(model, tokenizer, pairs, *, do_sample: bool, seed: int = 1234, batch_size: int = 512) -> float:
    """Fraction of ``pairs`` whose completion (up to the first EOS, which must be emitted) equals ``a+b``."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            enc = tokenizer([f"{a}+{b}=" for a, b in chunk], return_tensors="pt", padding=True)
            kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {}
            out = model.generate(
                **enc,
                max_new_tokens=5,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )
            completions = out[:, enc["input_ids"].shape[1] :].tolist()
            for (a, b), toks in zip(chunk, completions):
                if tokenizer.eos_token_id not in toks:
                    continue
                text = tokenizer.decode(toks[: toks.index(tokenizer.eos_token_id)])
                correct += text == str(a + b)
    model.train(was_training)
    return correct / len(pairs)


def portable_tokenizer_config(folder: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` (transformers 5 writes ``TokenizersBackend``,
    which transformers 4.x does not know; 5.x maps the old name to the same class)."""
    path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(QUICKSTART_POLICY), help="output folder (model + tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-accuracy", type=float, default=0.25, help="stop when sampled held-out acc >= this")
    p.add_argument("--max-steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(len(tokenizer), seed=args.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    train = train_pairs()
    heldout = heldout_pairs()
    print(f"params={n_params:,} train_pairs={len(train)} heldout_pairs={len(heldout)}", flush=True)

    ids, mask, labels = encode_examples(tokenizer, train)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    gen = torch.Generator().manual_seed(args.seed)

    t0 = time.perf_counter()
    step, greedy_acc, sampled_acc, history = 0, 0.0, 0.0, []
    while step < args.max_steps:
        idx = torch.randint(0, ids.shape[0], (args.batch_size,), generator=gen)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % args.eval_every == 0 or step == args.max_steps:
            sampled_acc = evaluate(model, tokenizer, heldout, do_sample=True, seed=args.seed + 1234)
            greedy_acc = evaluate(model, tokenizer, heldout, do_sample=False)
            elapsed = time.perf_counter() - t0
            history.append({"step": step, "seconds": round(elapsed, 1), "loss": round(loss.item(), 4),
                            "greedy_acc": greedy_acc, "sampled_acc": sampled_acc})
            print(f"step {step:5d}  {elapsed:6.1f}s  loss {loss.item():.4f}  "
                  f"heldout greedy {greedy_acc:.3f}  sampled(T=1) {sampled_acc:.3f}", flush=True)
            if sampled_acc >= args.target_accuracy:
                break
    seconds = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    portable_tokenizer_config(out)
    info = {
        "task": "a+b= with a, b uniform in [0, 100); completion = str(a+b) + eos",
        "heldout_rule": "(a * 7919 + b * 104729) % 20 == 0  (drpo_lightning.tiny.is_heldout)",
        "heldout_pairs": len(heldout),
        "steps": step,
        "seconds": round(seconds, 1),
        "greedy_acc": greedy_acc,
        "sampled_acc": sampled_acc,
        "sampled_eval_seed": args.seed + 1234,
        "target_accuracy": args.target_accuracy,
        "reached_target": sampled_acc >= args.target_accuracy,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "threads": args.threads,
        "params": n_params,
        "torch": torch.__version__,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
        if argv is None else "pretrain_quickstart.py " + " ".join(shlex.quote(a) for a in argv),
        "history": history,
    }
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out} after {step} steps, {seconds:.1f}s: greedy {greedy_acc:.3f}, sampled {sampled_acc:.3f}")


if __name__ == "__main__":
    main()
