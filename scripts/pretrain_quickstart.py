#!/usr/bin/env python
"""Supervised warm-up of the quickstart policy on ``a+b=`` (a, b uniform in [0, 100)).

Trains a ~1M-parameter Llama with the character tokenizer of :mod:`drpo_lightning.tiny` on
``f"{a}+{b}={a + b}" + eos`` for training pairs only (``not is_heldout(a, b)``), with the loss on the answer
tokens and EOS (prompt tokens masked). Every ``--eval-every`` steps it measures held-out accuracy on the
full held-out split (500 pairs), greedy and sampled at temperature 1 (the RL setting).

Two recipes:

- ``noisy-teacher`` (default, the shipped policy): train on clean answers until the *greedy* held-out
  accuracy reaches ``--skill-accuracy`` (the arithmetic generalises), then fine-tune for ``--noisy-steps``
  on answers that are right with probability ``--correct-prob`` and otherwise a plausible mistake (off by
  one or ten, or carries dropped). The result knows the answer (greedy ~0.94) but samples it only about a
  third of the time (sampled ~0.37): like a base model, the skill is there and RL's job is to sharpen it,
  so held-out accuracy rises steadily under RL (0.36 -> 0.67 in 100 quickstart steps).
- ``early-stop``: stop clean training as soon as the *sampled* accuracy reaches ``--target-accuracy``. The
  policy is then caught mid-way through learning the skill; RL raises its training reward but held-out
  accuracy barely moves and swings by +-0.1 between evaluations (measured: 0.24 -> 0.16..0.32 in 300
  steps), which is why it is no longer the default.

Saves the model (safetensors), tokenizer and ``pretrain_info.json`` to ``--out``
(default: ``drpo_lightning/assets/quickstart_policy``). Deterministic for a given seed and thread count.

    python scripts/pretrain_quickstart.py --threads 1                  # the shipped policy (~5 min)
    python scripts/pretrain_quickstart.py --recipe early-stop --target-accuracy 0.25
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


def plausible_mistakes(a: int, b: int) -> list[int]:
    """Wrong answers a student might give for ``a + b``: off by one or ten, or every carry dropped."""
    s = a + b
    no_carry = (a % 10 + b % 10) % 10 + 10 * ((a // 10 + b // 10) % 10)
    return sorted({x for x in (s - 10, s - 1, s + 1, s + 10, no_carry) if x >= 0 and x != s})


def encode_batch(tokenizer, pairs, answers):
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` for explicit (possibly wrong) answers."""
    rows, labels = [], []
    for (a, b), ans in zip(pairs, answers):
        prompt = tokenizer(f"{a}+{b}=", add_special_tokens=False)["input_ids"]
        answer = tokenizer(str(ans), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], lab[i, : len(lb)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(lb), 1
    return ids, mask, lab


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(QUICKSTART_POLICY), help="output folder (model + tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", choices=["early-stop", "noisy-teacher"], default="noisy-teacher",
                   help="early-stop: stop clean training once sampled acc >= --target-accuracy. "
                        "noisy-teacher: train until the skill is there (greedy >= --skill-accuracy), then "
                        "fine-tune to convergence on answers that are right with probability --correct-prob")
    p.add_argument("--target-accuracy", type=float, default=0.25, help="early-stop: stop when sampled acc >= this")
    p.add_argument("--skill-accuracy", type=float, default=0.9, help="noisy-teacher: end of clean phase (greedy)")
    p.add_argument("--correct-prob", type=float, default=0.3, help="noisy-teacher: P(target answer is right)")
    p.add_argument("--noisy-steps", type=int, default=400, help="noisy-teacher: steps of the noisy phase")
    p.add_argument("--noisy-lr", type=float, default=3e-4, help="noisy-teacher: peak lr, decays linearly to 0")
    p.add_argument("--max-steps", type=int, default=5000, help="cap on clean-phase steps")
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
    print(f"params={n_params:,} train_pairs={len(train)} heldout_pairs={len(heldout)} recipe={args.recipe}",
          flush=True)

    ids, mask, labels = encode_examples(tokenizer, train)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    gen = torch.Generator().manual_seed(args.seed)
    answer_rng = random.Random(args.seed)

    t0 = time.perf_counter()
    state = {"step": 0, "greedy": 0.0, "sampled": 0.0}
    history: list[dict] = []

    def train_step(batch) -> float:
        loss = model(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        state["step"] += 1
        return loss.item()

    def run_eval(loss: float, phase: str) -> None:
        state["sampled"] = evaluate(model, tokenizer, heldout, do_sample=True, seed=args.seed + 1234)
        state["greedy"] = evaluate(model, tokenizer, heldout, do_sample=False)
        elapsed = time.perf_counter() - t0
        history.append({"phase": phase, "step": state["step"], "seconds": round(elapsed, 1),
                        "loss": round(loss, 4), "greedy_acc": state["greedy"], "sampled_acc": state["sampled"]})
        print(f"[{phase}] step {state['step']:5d}  {elapsed:6.1f}s  loss {loss:.4f}  "
              f"heldout greedy {state['greedy']:.3f}  sampled(T=1) {state['sampled']:.3f}", flush=True)

    # Phase 1: clean supervised warm-up.
    clean_steps = 0
    while clean_steps < args.max_steps:
        idx = torch.randint(0, ids.shape[0], (args.batch_size,), generator=gen)
        loss = train_step((ids[idx], mask[idx], labels[idx]))
        clean_steps += 1
        if clean_steps % args.eval_every == 0 or clean_steps == args.max_steps:
            run_eval(loss, "clean")
            if args.recipe == "early-stop" and state["sampled"] >= args.target_accuracy:
                break
            if args.recipe == "noisy-teacher" and state["greedy"] >= args.skill_accuracy:
                break

    # Phase 2 (noisy-teacher): right answer with probability p, else a plausible mistake, fresh every step;
    # lr decays linearly to 0 so the model settles on the calibrated mixture.
    if args.recipe == "noisy-teacher":
        opt = torch.optim.AdamW(model.parameters(), lr=args.noisy_lr, weight_decay=args.weight_decay,
                                betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / args.warmup_steps, 1.0 - s / args.noisy_steps))
        for k in range(1, args.noisy_steps + 1):
            idx = torch.randint(0, len(train), (args.batch_size,), generator=gen).tolist()
            pairs = [train[i] for i in idx]
            answers = [a + b if answer_rng.random() < args.correct_prob
                       else answer_rng.choice(plausible_mistakes(a, b)) for a, b in pairs]
            loss = train_step(encode_batch(tokenizer, pairs, answers))
            if k % args.eval_every == 0 or k == args.noisy_steps:
                run_eval(loss, "noisy")
    seconds = time.perf_counter() - t0
    step, greedy_acc, sampled_acc = state["step"], state["greedy"], state["sampled"]

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
        "recipe": args.recipe,
        "steps": step,
        "clean_steps": clean_steps,
        "noisy_steps": args.noisy_steps if args.recipe == "noisy-teacher" else 0,
        "seconds": round(seconds, 1),
        "greedy_acc": greedy_acc,
        "sampled_acc": sampled_acc,
        "sampled_eval_seed": args.seed + 1234,
        "target_accuracy": args.target_accuracy if args.recipe == "early-stop" else None,
        "correct_prob": args.correct_prob if args.recipe == "noisy-teacher" else None,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "noisy_lr": args.noisy_lr if args.recipe == "noisy-teacher" else None,
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
