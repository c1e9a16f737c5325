"""Forward + backward time of each objective on one minibatch of per-token log-probs (CPU, float32).

    python benchmarks/bench_objectives.py            # [64, 4096] tokens
    python benchmarks/bench_objectives.py --smoke    # tiny shape, a few repeats (CI)

Prints the median time of each objective and its ratio to PPO (the cheapest reasonable baseline), then
whether DRPO stays within 1.3x PPO. Repeats are interleaved round-robin across objectives so that load from
other processes on a shared machine hits every objective alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from drpo_lightning.objectives.dppo import DPPO
from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.objectives.ppo import PPO

BUDGET = 1.3
"""DRPO's forward + backward may cost at most this many times PPO's."""


def make_batch(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Behaviour log-probs of sampled tokens: mostly likely tokens, a long tail of unlikely ones.
    old = -torch.rand(batch, length, generator=gen).pow(3) * 8  # [B, T]
    # The training forward drifts from the rollout by a mismatch of a few tenths of a nat.
    new = (old + 0.2 * torch.randn(batch, length, generator=gen)).clamp(max=0)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length) < lengths[:, None]).float()  # [B, T] ragged completions
    return {
        "logprobs": new,
        "old_logprobs": old,
        "advantages": torch.randn(batch, generator=gen),
        "mask": mask,
    }


def step(objective, batch: dict[str, torch.Tensor]) -> float:
    logprobs = batch["logprobs"].clone().requires_grad_()
    start = time.perf_counter()
    out = objective(
        logprobs=logprobs,
        old_logprobs=batch["old_logprobs"],
        advantages=batch["advantages"],
        mask=batch["mask"],
    )
    out.loss.backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shape and few repeats")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.length, args.warmup, args.repeats = 4, 64, 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    objectives = {
        "PPO (clip 0.2)": PPO(),
        "PPO dual-clip 3": PPO(dual_clip=3.0),
        "DPPO tv 0.15": DPPO(divergence="tv"),
        "DPPO kl 0.05": DPPO(divergence="kl", delta_low=0.05, delta_high=0.05),
        "DRPO delta 0.2": DRPO(delta=0.2),
        "DRPO delta 12.5": DRPO(delta=12.5),
    }
    batch = make_batch(args.batch, args.length)
    for objective in objectives.values():
        for _ in range(args.warmup):
            step(objective, batch)
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for _ in range(args.repeats):
        for name, objective in objectives.items():
            times[name].append(step(objective, batch))

    median = {name: statistics.median(t) for name, t in times.items()}
    baseline = median["PPO (clip 0.2)"]
    tokens = args.batch * args.length
    print(
        f"forward+backward, [{args.batch}, {args.length}] float32 = {tokens} tokens, CPU, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} after {args.warmup} warm-up"
    )
    # The ratio uses medians; the fastest run is shown too because a shared machine inflates medians.
    print(f"{'objective':<18} {'median ms':>10} {'min ms':>8} {'Mtok/s':>8} {'x PPO':>7}")
    for name, t in median.items():
        fastest = min(times[name])
        print(
            f"{name:<18} {t * 1e3:>10.2f} {fastest * 1e3:>8.2f} {tokens / t / 1e6:>8.1f} {t / baseline:>7.2f}"
        )
    worst = max(median["DRPO delta 0.2"], median["DRPO delta 12.5"]) / baseline
    verdict = "yes" if worst <= BUDGET else "NO"
    print(f"DRPO <= {BUDGET}x PPO: {verdict} (worst DRPO / PPO = {worst:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
