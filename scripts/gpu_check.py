#!/usr/bin/env python
"""GPU check of issue 14 (item 8): the flagship FSDP config, asynchronous rollouts and the quantized configs on
one GPU, with a Qwen2.5-0.5B-shaped model built from a config (random weights: nothing is downloaded).

    bash scripts/gpu_check.sh                 # on the GPU machine, repo root as CWD (< 8 minutes)
    GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh   # the same steps on the CPU, tiny model (plumbing only)
    python scripts/gpu_check.py --cpu-smoke   # the same, without the shell wrapper

Steps (each ``drpo fit`` is a subprocess of its own, with a timeout; one that fails is reported and the next
one runs):

(a) build the model: ``benchmarks/bench_vs_trl.py``'s ``qwen2.5-0.5b-shape`` (Qwen2, hidden 896, 24 layers,
    14 heads / 2 KV heads, vocabulary 151,936, tied embeddings; fp32) with its character tokenizer, saved to a
    temporary folder. The dry run builds the benchmark's 4k-parameter ``smoke`` Llama instead.
(b) ``drpo fit --config configs/drpo_fsdp.yaml`` with an override config: 1 GPU, bf16-mixed, this model, the
    built-in arithmetic task (``exact_match`` reward: math-verify is not needed), a fixed completion length
    (``min_new_tokens = max_new_tokens``: every step does the same work), no validation, checkpoint or export,
    a few rollout steps. The strategy (FSDP, activation checkpointing) is the config's own.
(c) the same with ``rollout: worker`` (``max_staleness: 1``; the worker process on the same GPU).
(d) per run: completion tokens/s = completion tokens per step / median wall time between the ends of
    consecutive trained steps (the first trained step, and the step that only fills the async pipeline, not
    counted), and MFU = 8 x parameters x (prompt + completion tokens) per step / that time / the GPU's dense
    bf16 peak (``PEAK_TFLOPS`` of the benchmark: 989.4 TFLOP/s for an H200; 2 FLOPs per parameter and token for
    sampling, 6 for the training forward and backward, attention and recomputation not counted).
(e) peak CUDA memory (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of the trainer process) of
    configs/drpo_8bit.yaml, drpo_int8_lora.yaml and drpo_qlora.yaml with this model, bf16-mixed, gradient
    checkpointing (and bf16 base weights for the two LoRA configs), 2 rollout steps each. They need
    bitsandbytes (and peft): without it each prints ``skipped: bitsandbytes not installed``.

Nothing is installed from the internet. What is missing is reported and, where possible, worked around
offline: without ``jsonargparse`` (``drpo fit`` is a LightningCLI) the wheels in ``--wheels`` (default
``build/gpu_check_wheels``, made by ``pip download`` on a machine with an index and carried along) are
installed with ``pip --no-index --target`` into a temporary folder; without drpo-lightning's package metadata
(the repo is used from its folder, not installed) a metadata folder naming its entry points (read from
pyproject.toml) is written to a temporary folder on ``PYTHONPATH``, so its plugins resolve by name.

Output: a markdown block of results on stdout, also written with the JSON results and the tails of every
run's log to ``$OUT`` (or ``--out``) when set. The whole check stops starting new runs when ``--budget-s``
(default 450 s) would be exceeded. Exit code 0 when every run that was not skipped succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "scripts", ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

QUANT_CONFIGS = (
    ("8-bit AdamW (full fine-tuning)", "drpo_8bit.yaml", False),
    ("int8 base + LoRA", "drpo_int8_lora.yaml", True),
    ("QLoRA (NF4 base + LoRA)", "drpo_qlora.yaml", True),
)
"""(label, config file, LoRA config: its base weights are loaded in bf16 on the GPU as the config advises)."""


@dataclasses.dataclass
class Run:
    """One row of the results: what ran, how it ended, what it measured."""

    key: str
    label: str
    config: str
    status: str = "not run"  # ok | failed | timed out | skipped
    note: str = ""
    seconds: float = 0.0
    numbers: dict[str, Any] = dataclasses.field(default_factory=dict)


class Budget:
    """Wall-clock budget of the whole check: each run's timeout is what is left, capped."""

    def __init__(self, seconds: float) -> None:
        self.start, self.total = time.monotonic(), float(seconds)

    def left(self) -> float:
        return self.total - (time.monotonic() - self.start)

    def timeout(self, cap: float) -> float:
        return max(0.0, min(cap, self.left() - 5.0))


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------- environment


def version_of(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure to import means "not usable here"
        return False
    return True


def add_path(env: dict[str, str], path: Path) -> None:
    """Put ``path`` on this process's ``sys.path`` and on its children's ``PYTHONPATH``."""
    if str(path) not in sys.path:
        sys.path.append(str(path))
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(path) not in parts:
        env["PYTHONPATH"] = os.pathsep.join([*parts, str(path)])
    importlib.invalidate_caches()


def install_local_wheels(wheels: Path, target: Path, env: dict[str, str]) -> str:
    """``pip install --no-index --no-deps --target`` of the wheels in ``wheels``: never reaches an index."""
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not files:
        return f"no wheels in {wheels}"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(target), *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"pip --no-index failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    add_path(env, target)
    return "installed from " + ", ".join(f.name for f in files)


def write_metadata_shim(pyproject: Path, target: Path) -> Path:
    """A ``drpo_lightning-<version>.dist-info`` folder (METADATA + entry_points.txt from pyproject.toml) so that
    ``importlib.metadata`` finds the built-in plugins of a repo used from its folder, not installed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads(pyproject.read_text())["project"]
    folder = target / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
    text = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
                   for group, eps in groups.items())
    (folder / "entry_points.txt").write_text(text)
    return folder


def has_builtin_plugins() -> bool:
    eps = importlib.metadata.entry_points(group="drpo_lightning.rollouts")
    return any(ep.name == "worker" for ep in eps)


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, str], list[str]]:
    """Environment of the ``drpo fit`` subprocesses, and one line per thing that was missing or worked around."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for path in (ROOT, ROOT / "scripts"):
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(path) not in parts:
            env["PYTHONPATH"] = os.pathsep.join([str(path), *parts])
    notes = []
    if not importable("jsonargparse"):
        outcome = install_local_wheels(Path(args.wheels), tmp / "site", env)
        ok = importable("jsonargparse")
        notes.append(f"jsonargparse not installed: {outcome}" + ("" if ok else " -> drpo fit cannot run"))
    if not has_builtin_plugins():
        folder = write_metadata_shim(ROOT / "pyproject.toml", tmp / "meta")
        add_path(env, folder.parent)
        notes.append(f"drpo-lightning not installed: entry points from pyproject.toml in {folder.name} on "
                     f"PYTHONPATH ({'ok' if has_builtin_plugins() else 'still not found'})")
    return env, notes


def environment_lines(gpu: bool) -> list[str]:
    import torch

    lines = [f"python {platform.python_version()}, torch {torch.__version__}"
             + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")]
    if gpu:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} "
                     f"visible")
    else:
        lines.append(f"device: CPU ({os.cpu_count()} cores), dry run")
    packages = ["lightning", "transformers", "jsonargparse", "peft", "bitsandbytes", "matplotlib"]
    lines.append("packages: " + ", ".join(f"{p} {version_of(p) or 'MISSING'}" for p in packages))
    return lines


# --------------------------------------------------------------------------------------------- runs


def build_model(gpu: bool, root: Path) -> tuple[str, int, str]:
    """(a): the benchmark's Qwen2.5-0.5B-shaped model (GPU) or its smoke Llama (dry run), saved under root."""
    from bench_vs_trl import MODELS, Workload, build_model_dir

    name = "qwen2.5-0.5b-shape" if gpu else "smoke"
    path, n_params = build_model_dir(Workload(model=name, seed=0), root)
    spec = MODELS[name]
    shape = (f"{spec['arch']}, hidden {spec['hidden']}, {spec['layers']} layers, {spec['heads']} heads"
             + (f" / {spec['kv_heads']} KV heads, vocabulary {spec['vocab']:,}" if "kv_heads" in spec else ""))
    return path, n_params, f"{name} ({shape})"


def load_config(name: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((ROOT / "configs" / name).read_text())


def override_for(gpu: bool, base: dict[str, Any], *, model_dir: str, run_dir: Path, probe: Path,
                 rollout_steps: int, new_tokens: int, batch_size: int | None) -> dict[str, Any]:
    """The keys every run overrides: one device, this model, the arithmetic task, no validation,
    checkpoints or export, the probe callback; ``max_steps`` counts optimizer updates."""
    model = base.get("model", {})
    updates_per_rollout = int(model.get("ppo_epochs", 1)) * int(model.get("num_minibatches", 1))
    trainer = {
        "accelerator": "gpu" if gpu else "cpu", "devices": 1, "precision": "bf16-mixed" if gpu else "32-true",
        "max_steps": rollout_steps * updates_per_rollout, "limit_val_batches": 0, "num_sanity_val_steps": 0,
        "enable_checkpointing": False, "enable_progress_bar": False, "default_root_dir": str(run_dir),
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(run_dir), "name": "drpo"}},
        "callbacks": [{"class_path": "gpu_check_probe.StepProbe", "init_args": {"out": str(probe)}}],
    }
    if not gpu and "strategy" in base.get("trainer", {}):
        trainer["strategy"] = "auto"  # the product refuses FSDP without CUDA: the dry run checks the rest
    data = {"path": None, "val_path": None, "task": "arithmetic", "task_size": 4096, "val_size": 64,
            "system_prompt": None}
    if batch_size is not None:
        data["batch_size"] = batch_size
    return {
        "trainer": trainer,
        "model": {"model_name_or_path": model_dir, "export_dir": "",
                  "rollout": hf_rollout(new_tokens),
                  "rewards": [{"class_path": "exact_match", "init_args": {"answer_column": "answer"}}]},
        "data": data,
    }


def hf_rollout(new_tokens: int) -> dict[str, Any]:
    return {"class_path": "hf", "init_args": {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                                              "temperature": 1.0}}


def drpo_fit(run: Run, configs: list[str], override: dict[str, Any], probe: Path, tmp: Path,
             env: dict[str, str], timeout: float, logs: list[str]) -> dict[str, Any] | None:
    """Run ``drpo fit --config <configs...> --config <override>``; the probe's JSON, or None (run.status says)."""
    import yaml

    if timeout < 30:
        run.status, run.note = "skipped", "out of time budget"
        return None
    override_path = tmp / f"override_{run.key}.yaml"
    override_path.write_text(yaml.safe_dump(override, sort_keys=False))
    cmd = [sys.executable, "-m", "drpo_lightning.cli", "fit"]
    for config in configs:
        cmd += ["--config", config]
    cmd += ["--config", str(override_path)]
    log_path = tmp / f"{run.key}.log"
    say(f"-- {run.key}: {run.label} (timeout {timeout:.0f} s)")
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the run and the rollout worker it started
            proc.wait()
            code = None
    run.seconds = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    logs.append(f"===== {run.key}: {' '.join(cmd)}\n" + "\n".join(lines[-60:]) + "\n")
    if code is None:
        run.status, run.note = "timed out", f"stopped after {timeout:.0f} s"
    elif code != 0 or not probe.is_file():
        errors = [ln for ln in lines if ln.startswith("drpo: error:")] or lines[-1:] or ["no output"]
        run.status, run.note = "failed", f"exit {code}: {errors[0][:300]}"
    else:
        run.status = "ok"
        return json.loads(probe.read_text())
    say(f"   {run.status}: {run.note}")
    return None


def measure(result: dict[str, Any], n_params: int, peak_flops: float | None) -> dict[str, Any]:
    """(d) and peak memory from the probe's records."""
    trained = [s for s in result["steps"] if s["trained"]]
    stamps = [s["t"] for s in trained]
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    out: dict[str, Any] = {"trained_steps": len(trained), "timed_steps": len(intervals),
                           "filling_steps": sum(not s["trained"] for s in result["steps"])}
    counted = trained[1:]
    if intervals and all("completion/length_mean" in s for s in counted):
        step = statistics.median(intervals)
        rows = statistics.mean(s["prompts"] * s["num_generations"] for s in counted)
        completion = statistics.mean(s["completion/length_mean"] for s in counted)
        prompt = statistics.mean(s["prompt_tokens"] / max(s["prompts"], 1) for s in counted)
        out.update(step_s=step, rows=rows, completion_tokens=completion, prompt_tokens=prompt,
                   tokens_per_s=rows * completion / step)
        if peak_flops:
            out["mfu"] = 8 * n_params * rows * (prompt + completion) / step / peak_flops
        for key in ("perf/rollout_s", "rollout/wait_s", "rollout/sync_s", "rollout/staleness_max"):
            values = [s[key] for s in counted if key in s]
            if values:
                out[key] = statistics.median(values)
    out["peak"] = result.get("peak", {})
    return out


def gpu_peak_flops() -> float | None:
    import torch
    from bench_vs_trl import PEAK_TFLOPS

    name = torch.cuda.get_device_name()
    for key, (_, bf16) in PEAK_TFLOPS.items():
        if key in name:
            return bf16 * 1e12
    return None


# ------------------------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def markdown(runs: list[Run], header: list[str], gpu: bool, peak_flops: float | None) -> str:
    out = ["### GPU check (issue 14 item 8)" + ("" if gpu else ": CPU DRY RUN (plumbing only, no figures)"), ""]
    out += [f"- {line}" for line in header]
    out += ["", "| run | config | status | steps timed | step s (median) | completion tokens/s | MFU | "
            "peak CUDA MiB allocated / reserved | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        n = r.numbers
        peak = n.get("peak", {})
        if "cuda_allocated_mib" in peak:
            memory = f"{peak['cuda_allocated_mib']:,.0f} / {peak['cuda_reserved_mib']:,.0f}"
        elif peak.get("rss_mib") is not None:
            memory = f"(CPU: peak RSS {peak['rss_mib']:,.0f})"
        else:
            memory = "-"
        notes = [r.note] if r.note else []
        if "rollout/staleness_max" in n and r.key == "c":
            notes.append(f"staleness max {n['rollout/staleness_max']:.0f}, trainer waits "
                         f"{1000 * n.get('rollout/wait_s', float('nan')):.0f} ms/step, weight sync "
                         f"{1000 * n.get('rollout/sync_s', float('nan')):.0f} ms/step")
        if "perf/rollout_s" in n and r.key in ("b", "c"):
            notes.append(f"rollout {1000 * n['perf/rollout_s']:.0f} ms/step in the trainer")
        if n.get("rows"):
            notes.append(f"{n['rows']:.0f} rows x ({n['prompt_tokens']:.1f} prompt + {n['completion_tokens']:.0f} "
                         "completion) tokens/step")
        if r.seconds:
            notes.append(f"run {r.seconds:.0f} s")
        mfu = f"{100 * n['mfu']:.1f}%" if "mfu" in n else ("-" if gpu and peak_flops is None else "n/a")
        out.append(f"| ({r.key}) {r.label} | {r.config} | {r.status} | {n.get('timed_steps', '-')} | "
                   f"{fmt(n.get('step_s'), '.3f')} | {fmt(n.get('tokens_per_s'), ',.0f')} | {mfu} | {memory} | "
                   f"{'; '.join(notes)} |")
    if peak_flops:
        out += ["", f"MFU: 8 x parameters x (prompt + completion tokens) per step / median step / "
                    f"{peak_flops / 1e12:.1f} TFLOP/s (dense bf16 peak); attention and recomputation not counted."]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        default=os.environ.get("GPU_CHECK_DRY_RUN", "") not in ("", "0"),
                        help="CPU dry run with a tiny model (also GPU_CHECK_DRY_RUN=1)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting runs after this (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="rollout steps per run (default 6; dry run 3)")
    parser.add_argument("--quant-steps", type=int, default=2, help="rollout steps per quantized config")
    parser.add_argument("--new-tokens", type=int, default=None, help="completion tokens (default 128; dry run 4)")
    parser.add_argument("--only", default="b,c,e", help="runs to do, of b,c,e (a always runs)")
    parser.add_argument("--wheels", default=str(ROOT / "build" / "gpu_check_wheels"),
                        help="folder of wheels installed with --no-index when jsonargparse is missing")
    parser.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for the results (default $OUT)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, run logs)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)

    import torch

    gpu = not args.cpu_smoke
    if gpu and not torch.cuda.is_available():
        say("gpu_check: no CUDA device here; for the CPU dry run use GPU_CHECK_DRY_RUN=1 (or --cpu-smoke)")
        return 2
    steps = args.steps or (6 if gpu else 3)
    new_tokens = args.new_tokens or (128 if gpu else 4)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    logs: list[str] = []
    runs: list[Run] = []
    try:
        env, notes = prepare(args, tmp)
        if not gpu:
            env.setdefault("OMP_NUM_THREADS", "1")  # a dry run stays off the other core
        header = environment_lines(gpu) + notes
        for line in header:
            say(line)

        start = time.monotonic()
        model_dir, n_params, shape = build_model(gpu, tmp)
        header.append(f"(a) model: {shape}, {n_params:,} parameters, random weights, fp32 on disk; built and saved "
                      f"in {time.monotonic() - start:.0f} s")
        say(header[-1])
        peak_flops = gpu_peak_flops() if gpu else None
        drpo_fsdp = load_config("drpo_fsdp.yaml")
        base_args = dict(model_dir=model_dir, rollout_steps=steps, new_tokens=new_tokens,
                         batch_size=None if gpu else 2)
        can_fit = importable("jsonargparse")

        def fit_run(run: Run, configs: list[str], override: dict[str, Any], probe: Path, cap: float) -> None:
            runs.append(run)
            if not can_fit:
                run.status, run.note = "skipped", "jsonargparse not installed (drpo fit is a LightningCLI)"
                say(f"-- {run.key}: skipped: {run.note}")
                return
            result = drpo_fit(run, configs, override, probe, tmp, env, budget.timeout(cap), logs)
            if result is not None:
                run.numbers = measure(result, n_params, peak_flops)
                say(f"   ok: {json.dumps({k: v for k, v in run.numbers.items() if k != 'peak'})}")

        if "b" in only:
            probe = tmp / "probe_b.json"
            override = override_for(gpu, drpo_fsdp, run_dir=tmp / "run_b", probe=probe, **base_args)
            fit_run(Run("b", "sync, " + ("FSDP, 1 GPU, bf16-mixed" if gpu else "strategy auto (FSDP needs CUDA)"),
                        "drpo_fsdp.yaml"),
                    ["configs/drpo_fsdp.yaml"], override, probe, 180)

        if "c" in only:
            probe = tmp / "probe_c.json"
            override = override_for(gpu, drpo_fsdp, run_dir=tmp / "run_c", probe=probe, **base_args)
            worker: dict[str, Any] = {"engine": hf_rollout(new_tokens), "max_staleness": 1,
                                      "device": "cuda:0" if gpu else "cpu", "timeout": 300.0,
                                      "start_timeout": 300.0}
            if not gpu:
                worker.update(threads=1, trainer_threads=1)
            override["model"]["rollout"] = {"class_path": "worker", "init_args": worker}
            fit_run(Run("c", "async k=1, worker on the same " + ("GPU" if gpu else "CPU"),
                        "drpo_fsdp.yaml + rollout: worker"), ["configs/drpo_fsdp.yaml"], override, probe, 210)

        if "e" in only:
            missing = [p for p in ("bitsandbytes", "peft") if not importable(p)]
            for label, name, lora in QUANT_CONFIGS:
                run = Run(f"e{len([r for r in runs if r.key.startswith('e')]) + 1}", label, name)
                if "bitsandbytes" in missing or (lora and "peft" in missing):
                    runs.append(run)
                    gone = "bitsandbytes" if "bitsandbytes" in missing else "peft"
                    run.status, run.note = "skipped", f"{gone} not installed"
                    say(f"-- {run.key}: {name}: skipped: {gone} not installed")
                    continue
                probe = tmp / f"probe_{run.key}.json"
                config = load_config(name)
                override = override_for(gpu, config, run_dir=tmp / f"run_{run.key}", probe=probe,
                                        **{**base_args, "rollout_steps": args.quant_steps,
                                           "new_tokens": min(new_tokens, 64)})
                if gpu:
                    override["model"]["gradient_checkpointing"] = True
                    if lora:
                        override["model"]["model_kwargs"] = {"dtype": "bfloat16"}
                fit_run(run, [f"configs/{name}"], override, probe, 120)

        block = markdown(runs, header, gpu, peak_flops)
        say("\n" + block)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_check.md").write_text(block)
            (out / "gpu_check.json").write_text(json.dumps(
                {"gpu": gpu, "header": header, "runs": [dataclasses.asdict(r) for r in runs]}, indent=1,
                default=str))
            (out / "gpu_check_runs.log").write_text("\n".join(logs))
            say(f"(written to {out}/gpu_check.md, gpu_check.json, gpu_check_runs.log)")
        say(f"gpu_check: {time.monotonic() - budget.start:.0f} s")
    finally:
        if args.keep:
            say(f"(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    failed = [r.key for r in runs if r.status in ("failed", "timed out")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
