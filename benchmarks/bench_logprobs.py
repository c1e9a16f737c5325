"""Peak memory and time of per-token log-probs + entropy + backward: naive vs memory-lean.

    python benchmarks/bench_logprobs.py            # V = 151,936, T = 4,096, H = 896 (needs ~12 GB RAM)
    python benchmarks/bench_logprobs.py --smoke    # small sizes, a few seconds

Variants (each scores T tokens of one sequence, takes the entropy too, and back-propagates a loss that
uses both, so both gradient paths run):

- ``naive``: ``log_softmax((h @ W.T).float() / temperature)``, gather, ``-(p * logp).sum(-1)``, autograd.
- ``lean``: :func:`drpo_lightning.logprobs.token_logprobs_from_hidden` (fused head, chunked, recomputed in
  backward).
- ``from_logits``: full logits, then :func:`drpo_lightning.logprobs.token_logprobs_from_logits` (the
  fallback for models whose head cannot be split off).

How memory is measured: every variant runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``,
so glibc serves every tensor bigger than 64 KiB with its own ``mmap`` and unmaps it on free: the resident
set size then follows the bytes actually alive, with no allocator cache in between (PyTorch's CPU
allocator does not cache either). After the inputs are built, the worker records its RSS as the
baseline, resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``; if that is refused it
falls back to ``ru_maxrss``, whose lifetime peak is then still dominated by the run) and reads ``VmHWM``
after the run: peak = VmHWM - baseline, i.e. everything the forward + backward allocated at its worst
moment, gradients of the inputs included. On CUDA the same is done with
``torch.cuda.max_memory_allocated``. Time is the best of ``--repeats`` runs (forward + backward).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from proc_memory import reset_peak, rss_kib  # benchmarks/ is on sys.path when run as a script

VARIANTS = ("naive", "lean", "from_logits")


def worker(args: argparse.Namespace) -> dict:
    """Run one variant in this (fresh) process; return peak bytes above the post-setup baseline and time."""
    import gc

    import torch

    from drpo_lightning.logprobs import token_logprobs_from_hidden, token_logprobs_from_logits

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    temp = args.temperature

    def make(n: int, h: int, v: int):
        torch.manual_seed(0)
        hidden = (torch.randn(1, n, h, device=device) * 0.5).to(dtype).requires_grad_()  # [1, T, H]
        weight = torch.nn.Parameter((torch.randn(v, h, device=device) * h**-0.5).to(dtype))  # [V, H]
        targets = torch.randint(0, v, (1, n), device=device)  # [1, T]
        g_lp = torch.randn(1, n, device=device)  # upstream gradients of the two outputs
        g_ent = torch.randn(1, n, device=device) * 0.1
        return hidden, weight, targets, g_lp, g_ent

    def run(hidden, weight, targets, g_lp, g_ent):
        hidden.grad = weight.grad = None
        if args.variant == "naive":
            logits = hidden @ weight.t()  # [1, T, V]
            logp = torch.log_softmax(logits.float() / temp, dim=-1)  # [1, T, V] float32
            del logits
            lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [1, T]
            ent = -(logp.exp() * logp).sum(-1)  # [1, T]
        elif args.variant == "lean":
            lp, ent, _ = token_logprobs_from_hidden(
                hidden, weight, targets, temperature=temp, chunk_size=args.chunk_size
            )
        else:
            logits = hidden @ weight.t()  # [1, T, V]
            lp, ent, _ = token_logprobs_from_logits(
                logits, targets, temperature=temp, chunk_size=args.chunk_size
            )
            del logits
        loss = (lp * g_lp).sum() + (ent * g_ent).sum()
        loss.backward()
        return lp.detach(), ent.detach()

    # Warm-up on a tiny problem: kernels, thread pools and code pages are loaded before the baseline.
    run(*make(16, 8, 64))
    inputs = make(args.tokens, args.hidden, args.vocab)
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        reset = True
    else:
        base = rss_kib("VmRSS") * 1024
        reset = reset_peak()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        lp, ent = run(*inputs)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        hwm = rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = hwm * 1024 - base
    return {
        "variant": args.variant,
        "peak_bytes": int(peak),
        "seconds": min(times),
        "peak_reset": reset,
        "logprob_mean": float(lp.mean()),
        "entropy_mean": float(ent.mean()),
    }


def spawn(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant]
    for key in ("tokens", "hidden", "vocab", "chunk_size", "dtype", "device", "repeats", "temperature"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="small sizes (seconds): V=8192, T=512, H=64, best of 3"
    )
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--chunk-size", type=int, default=None, help="default: the library default")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--variants", default="naive,lean,from_logits", help="comma-separated subset")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.chunk_size is None:
        from drpo_lightning.logprobs import DEFAULT_CHUNK_SIZE

        args.chunk_size = DEFAULT_CHUNK_SIZE
    if args.worker:
        args.variant = args.worker
        print(json.dumps(worker(args)))
        return
    if args.smoke:
        args.tokens, args.hidden, args.vocab = 512, 64, 8192
        args.chunk_size = min(args.chunk_size, 128)
        args.repeats = max(args.repeats, 3)  # small runs are dominated by one-off costs: take the best of 3

    variants = [v for v in args.variants.split(",") if v]
    if "naive" not in variants:
        variants.insert(0, "naive")
    print(
        f"per-token log-probs + entropy + backward: T={args.tokens}, H={args.hidden}, V={args.vocab}, "
        f"dtype={args.dtype}, device={args.device}, chunk_size={args.chunk_size}, repeats={args.repeats}"
    )
    results = {v: spawn(args, v) for v in variants}
    naive = results["naive"]
    print(
        f"{'variant':<12} {'peak MiB':>10} {'x naive':>8} {'seconds':>9} {'x naive':>8}  logprob/entropy mean"
    )
    for v, r in results.items():
        print(
            f"{v:<12} {r['peak_bytes'] / 2**20:>10.1f} {r['peak_bytes'] / naive['peak_bytes']:>8.3f} "
            f"{r['seconds']:>9.2f} {r['seconds'] / naive['seconds']:>8.3f}  "
            f"{r['logprob_mean']:.6f} / {r['entropy_mean']:.6f}"
        )
    if not all(r["peak_reset"] for r in results.values()):
        print("note: /proc/self/clear_refs was refused; peaks are ru_maxrss lifetime peaks minus baseline")
    goals = {}
    if "lean" in results:
        mem = results["lean"]["peak_bytes"] / naive["peak_bytes"]
        sec = results["lean"]["seconds"] / naive["seconds"]
        goals = {"lean_peak_vs_naive": (mem, mem <= 0.15), "lean_time_vs_naive": (sec, sec <= 1.3)}
        print(f"lean / naive peak memory: {mem:.3f}x; goal <= 0.15x: {'MET' if mem <= 0.15 else 'NOT MET'}")
        print(f"lean / naive time: {sec:.3f}x; goal <= 1.3x: {'MET' if sec <= 1.3 else 'NOT MET'}")
        if args.smoke:
            print("(smoke run: small sizes, the ratios say little about V=151,936, T=4,096)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "results": results,
                       "goals": goals}, f, indent=2)


if __name__ == "__main__":
    main()
