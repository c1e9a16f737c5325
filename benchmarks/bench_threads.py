"""The ``--threads N`` (N >= 2) mode of ``bench_vs_trl.py``: every contender gets the whole N-core machine.

    python benchmarks/bench_vs_trl.py --threads 2                  # 1m and 10m
    python benchmarks/bench_vs_trl.py --threads 2 --smoke          # tiny model, few steps (tests)

The 1-thread mode gives each contender one core, so asynchronous rollouts (a worker process sampling the
next batch while the trainer trains) cannot show there: they need a second core. Here the machine's N cores
are shared out the way each contender would use them:

- ``bare`` and ``trl``: N intra-op threads (``torch.set_num_threads(N)``).
- ``sync``: drpo-lightning with its in-process rollout, N threads.
- ``async k=0/1/2``: drpo-lightning with the ``worker`` rollout plugin, ``max_staleness`` k; the trainer on N-1
  threads (``trainer_threads``), the worker process on 1 (``threads``), as a rollout engine on its own GPU
  would be. k = 0 samples in the worker but waits for it (no overlap); k >= 1 samples batch t + k while the
  trainer trains on batch t.
- ``sync (N-1 threads)``: drpo-lightning synchronous on the trainer's share only: the baseline of the
  overlap line ``async / sync (1 core)``, which shows how much of the rollout the worker takes off the
  trainer's step.

Timing is the 1-thread mode's: all contenders in one process, alternating in rounds, each round a fresh
``fit``/``train`` of ``--steps-per-round`` counted steps; a step is the time between the ends of two
consecutive steps; ``--warmup`` steps before the first round and the first step of every round are not
counted. An async round also starts with k steps that only fill the pipeline (they train nothing; Lightning
counts only trained steps in ``max_steps``): they are not counted either, nor is the first trained step after
them. Each async round starts its own worker process (in ``on_train_start``, before the first step: not
timed). The per-step rollout figures come from the metrics the loop logs (``trainer.callback_metrics``
read at the end of each counted step): ``perf/rollout_s`` (from the start of the step until its rollout is
in hand), ``rollout/wait_s`` (of that, the wait for the batch) and ``rollout/sync_s`` (sending the
weights to the worker after the update).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

ASYNC_KS = (0, 1, 2)
WORKER_THREADS = 1
LOGGED = ("perf/rollout_s", "perf/step_s", "rollout/wait_s", "rollout/sync_s", "rollout/staleness_max")

# Goals of issue 14 for this mode.
OVERLAP_GOAL = 0.75  # async k=1 / sync (trainer's cores) step time, at 10m
OVERLAP_GOAL_SIZE = "10m"
TRL_GOAL = 1.3  # drpo-lightning best mode / TRL tokens/s, every size


class MetricsTap:
    """Lightning callback: the logged rollout metrics of every trained step of a round.

    Built lazily (``make``) so that importing this module does not import Lightning.
    """

    @staticmethod
    def make():
        import lightning.pytorch as pl

        class Tap(pl.Callback):
            def __init__(self) -> None:
                self.records: list[dict[str, float]] = []
                self._last_step = -1

            def on_train_start(self, trainer, pl_module) -> None:
                self.records, self._last_step = [], trainer.global_step

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if trainer.global_step == self._last_step:
                    return  # a step that only filled the pipeline: nothing trained, nothing logged
                self._last_step = trainer.global_step
                metrics = trainer.callback_metrics
                self.records.append({k: float(metrics[k]) for k in LOGGED if k in metrics})

        return Tap()


class PipelinedRunner:
    """A ``DrpoRunner`` with a ``worker`` rollout of ``max_staleness`` k: ``run(steps)`` trains ``steps``
    batches after k pipeline-filling steps and returns the step-end stamps of the trained ones only."""

    def __init__(self, runner: Any, k: int) -> None:
        self.runner, self.k = runner, k
        self.name = runner.name

    def run(self, steps: int) -> list[float]:
        stamps = self.runner.run(steps)
        if len(stamps) != steps + self.k:
            raise RuntimeError(f"async k={self.k}: expected {steps} trained + {self.k} filling steps, "
                               f"got {len(stamps)} step ends")
        return stamps[self.k:]


@dataclasses.dataclass
class Contender:
    key: str
    label: str
    runner: Any
    threads: int  # torch threads of this process during its rounds (async: the feed lowers them to trainer's)
    tap: Any = None  # MetricsTap of drpo-lightning contenders
    taps: list[list[dict[str, float]]] = dataclasses.field(default_factory=list)  # per round, counted steps


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def make_contenders(w, model_dir: str, data_path: str, classes: dict[str, type]) -> list[Contender]:
    """All contenders of one size, each with its own model and optimizer (same seed, same weights)."""
    from drpo_lightning.rollouts.hf import HFRollout
    from drpo_lightning.rollouts.worker_engine import WorkerRollout

    n, trainer_threads = w.threads, w.threads - WORKER_THREADS
    out: list[Contender] = []
    torch.manual_seed(w.seed)
    out.append(Contender("bare", f"bare PyTorch ({_plural(n, 'thread')})", classes["bare"](w, model_dir, data_path), n))
    trl = classes["trl"](w, model_dir, data_path)
    out.append(Contender("trl", f"{trl.name} ({_plural(n, 'thread')})", trl, n))

    def drpo(key: str, label: str, threads: int, rollout=None, k: int | None = None) -> Contender:
        runner = classes["drpo"](w, model_dir, data_path, rollout=rollout)
        tap = MetricsTap.make()
        runner.extra_callbacks = [tap]
        return Contender(key, label, runner if k is None else PipelinedRunner(runner, k), threads, tap)

    out.append(drpo("sync", f"drpo-lightning sync ({_plural(n, 'thread')})", n))
    out.append(drpo("sync_trainer", f"drpo-lightning sync ({_plural(trainer_threads, 'thread')})", trainer_threads))
    for k in ASYNC_KS:
        engine = HFRollout(max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens)
        rollout = WorkerRollout(engine, max_staleness=k, device=w.device, threads=WORKER_THREADS,
                                trainer_threads=trainer_threads, timeout=300.0)
        out.append(drpo(f"async{k}", f"drpo-lightning async k={k} ({trainer_threads}+{WORKER_THREADS} cores)", n,
                        rollout=rollout, k=k))
    return out


def run_rounds(contenders: list[Contender], warmup: int, rounds: int, steps_per_round: int) -> dict[str, list]:
    """Warm-up (not counted), then ``rounds`` rounds alternating over the contenders; stamps per round."""

    def one(c: Contender, steps: int) -> list[float]:
        torch.set_num_threads(c.threads)
        stamps = c.runner.run(steps)
        if torch.get_num_threads() != c.threads:
            print(f"warning: {c.label} left torch's thread count at {torch.get_num_threads()}; reset")
            torch.set_num_threads(c.threads)
        return stamps

    for c in contenders:
        if warmup > 0:
            one(c, warmup)
    stamps: dict[str, list[list[float]]] = {c.key: [] for c in contenders}
    for _ in range(rounds):
        for c in contenders:
            stamps[c.key].append(one(c, steps_per_round + 1))
            if c.tap is not None:
                c.taps.append(c.tap.records[1:])  # the first trained step of a round has no counted interval
    return stamps


def _ms(x: float) -> str:
    return f"{1000 * x:.1f} ms"


def bench_threads(args, w, model_dir: str, data_path: str, result: dict[str, Any], classes: dict[str, type],
                  summarise, quartiles) -> dict[str, Any]:
    """Time every contender on the whole machine and print the overlap, TRL and hidden-rollout lines."""
    start = time.perf_counter()
    contenders = make_contenders(w, model_dir, data_path, classes)
    stamps = run_rounds(contenders, args.warmup, args.rounds, args.steps_per_round)
    n, trainer_threads = w.threads, w.threads - WORKER_THREADS
    stats: dict[str, dict[str, Any]] = {}
    for c in contenders:
        xs = summarise(stamps[c.key])
        med = statistics.median(xs)
        s = {"name": c.label, "threads": c.threads, "steps": len(xs), "median_s": med, "iqr_s": quartiles(xs),
             "tokens_per_s": w.tokens_per_step / med,
             "round_medians_s": [statistics.median(summarise([r])) for r in stamps[c.key]]}
        records = [rec for per_round in c.taps for rec in per_round]
        for key in LOGGED:
            values = [rec[key] for rec in records if key in rec]
            if values:
                s[key] = statistics.median(values)
        stats[c.key] = s
    result["timing"] = stats
    result["threads_mode"] = {"threads": n, "trainer_threads": trainer_threads, "worker_threads": WORKER_THREADS,
                              "seconds": time.perf_counter() - start}

    # -- report --
    print(f"{'':38s} {'steps':>5s} {'step s median [IQR]':>24s} {'tokens/s':>9s} {'rollout ms':>10s} "
          f"{'wait ms':>8s} {'w-sync ms':>9s}")
    for c in contenders:
        s = stats[c.key]
        lo, hi = s["iqr_s"]
        extra = "".join(f" {1000 * s[key]:{width}.1f}" if key in s else f" {'-':>{width}s}"
                        for key, width in (("perf/rollout_s", 10), ("rollout/wait_s", 8), ("rollout/sync_s", 9)))
        print(f"{s['name']:38s} {s['steps']:5d} {s['median_s']:8.3f} [{lo:.3f}-{hi:.3f}] "
              f"{s['tokens_per_s']:9.0f}{extra}")

    goals: dict[str, tuple[float, bool]] = {}
    base = stats["sync_trainer"]
    cores = f"{trainer_threads}+{WORKER_THREADS} cores"
    base_label = f"sync ({_plural(trainer_threads, 'core')})"
    for k in ASYNC_KS:
        ratio = stats[f"async{k}"]["median_s"] / base["median_s"]
        line = f"drpo-lightning async k={k} ({cores}) / {base_label} step time: {ratio:.2f}x"
        if k == 1:
            if w.model == OVERLAP_GOAL_SIZE:
                met = ratio <= OVERLAP_GOAL
                goals["async_k1_vs_sync_trainer"] = (ratio, met)
                line += f"; goal <= {OVERLAP_GOAL:.2f}x: {'MET' if met else 'NOT MET'}"
            else:
                line += f" (goal <= {OVERLAP_GOAL:.2f}x is for {OVERLAP_GOAL_SIZE})"
        print(line)

    # The same overlap against synchronous training on every core: the comparison that decides whether to
    # split a machine's cores between trainer and worker at all.
    print(f"drpo-lightning async ({cores}) / {stats['sync']['name'].removeprefix('drpo-lightning ')} step time: "
          + ", ".join(f"k={k} {stats[f'async{k}']['median_s'] / stats['sync']['median_s']:.2f}x" for k in ASYNC_KS))

    modes = ["sync"] + [f"async{k}" for k in ASYNC_KS]
    trl_tps = stats["trl"]["tokens_per_s"]
    best = max(modes, key=lambda m: stats[m]["tokens_per_s"])
    best_ratio = stats[best]["tokens_per_s"] / trl_tps
    met = best_ratio >= TRL_GOAL
    goals["best_tokens_per_s_vs_trl"] = (best_ratio, met)
    result["best_mode"] = best
    print(f"drpo-lightning best / TRL tokens/s: {best_ratio:.2f}x ({stats[best]['name'].removeprefix('drpo-lightning ')}); "
          f"goal >= {TRL_GOAL:.2f}x: {'MET' if met else 'NOT MET'}")
    for m in modes:
        ratio = stats[m]["tokens_per_s"] / trl_tps
        paired = [t / d for t, d in zip(stats["trl"]["round_medians_s"], stats[m]["round_medians_s"])]
        print(f"  {stats[m]['name']} / TRL tokens/s: {ratio:.2f}x (per round {min(paired):.2f}-{max(paired):.2f}x)")
    print(f"  {stats['bare']['name']} / TRL tokens/s: {stats['bare']['tokens_per_s'] / trl_tps:.2f}x")

    rollout = base.get("perf/rollout_s")
    hidden: dict[str, dict[str, float]] = {}
    if rollout is None:
        print("rollout hidden per step: no perf/rollout_s logged by the synchronous baseline")
    else:
        for k in ASYNC_KS:
            s = stats[f"async{k}"]
            got = s.get("perf/rollout_s")
            if got is None:
                print(f"rollout hidden per step, async k={k}: no perf/rollout_s logged")
                continue
            h = rollout - got
            hidden[f"async{k}"] = {"hidden_s": h, "share": h / rollout, "trainer_rollout_s": got,
                                   "wait_s": s.get("rollout/wait_s", float("nan")),
                                   "weight_sync_s": s.get("rollout/sync_s", float("nan"))}
            print(f"rollout hidden per step, async k={k}: {_ms(h)} of the {base_label} rollout's {_ms(rollout)} "
                  f"({100 * h / rollout:.0f}%); the trainer still takes {_ms(got)} to get its rollout (waiting "
                  f"{_ms(hidden[f'async{k}']['wait_s'])}), then {_ms(hidden[f'async{k}']['weight_sync_s'])} "
                  "sending weights")
    result["hidden"] = hidden
    result["goals"] = goals
    print(f"({len(contenders)} contenders, {args.rounds} round(s) of {args.steps_per_round} counted steps each: "
          f"{time.perf_counter() - start:.0f} s)")
    return result


def print_goals(results: list[dict[str, Any]]) -> None:
    """One line per goal and size, after all sizes."""
    print("\ngoals (--threads mode):")
    for r in results:
        for name, (value, met) in r.get("goals", {}).items():
            print(f"  {r['model']}: {name} = {value:.2f}x -> {'MET' if met else 'NOT MET'}")
