"""Memory of one training configuration vs another: fp32 AdamW, 8-bit AdamW, int8 + LoRA, NF4 + LoRA.

    python benchmarks/bench_memory.py            # a ~36M-parameter Llama, 2 x 128 tokens (a few minutes)
    python benchmarks/bench_memory.py --smoke    # a tiny Llama (most of its minute is imports)
    python benchmarks/bench_memory.py --device cuda   # also the CUDA peak (torch.cuda.max_memory_allocated)

Every configuration loads the same saved Llama-shaped model through :func:`drpo_lightning.models.load_policy`
(the code path of ``RLModule``) and runs ``--steps`` training steps: the memory-lean log-prob forward of
:func:`drpo_lightning.logprobs.policy_token_stats` on random tokens, a policy-gradient-shaped loss, backward,
gradient clipping, ``optimizer.step()``, ``zero_grad(set_to_none=True)``.

Configurations (the same choices as the configs/ files):

- ``adamw_fp32``: full fine-tuning, fp32 weights, ``torch.optim.AdamW`` (the reference, 1.0x).
- ``adamw8bit``: full fine-tuning, ``bitsandbytes.optim.AdamW8bit`` (configs/drpo_8bit.yaml).
- ``int8_lora``: 8-bit base weights + rank-16 LoRA on all linear layers, AdamW (configs/drpo_int8_lora.yaml).
- ``nf4_lora``: 4-bit NF4 base (double quant, bf16 compute) + rank-16 LoRA, AdamW (configs/drpo_qlora.yaml).
  The quantized configurations load the non-quantized weights (embeddings, norms, head) in bf16, as one
  would on a GPU (``model.model_kwargs: {dtype: bfloat16}``).

What is measured, per configuration:

- ``optimizer state``: bytes of every tensor in ``optimizer.state`` after the first step (the moments; for
  bitsandbytes also the block scales and quantization maps).
- ``weights``: bytes of the model's parameters and buffers plus the quantization state of 4-bit layers
  (block scales, nested scales, code book), each storage counted once; ``grads``: bytes of ``.grad`` tensors.
- ``peak``: the process's resident-set high-water mark while training, above its RSS after the imports
  (so it counts the model, gradients, optimizer state, activations and temporaries, but not the Python
  runtime and libraries). Each configuration runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``
  so glibc returns freed tensors to the kernel at once (PyTorch's CPU allocator does not cache), and the
  high-water mark is reset after loading (``/proc/self/clear_refs``), so the loading transient (reading
  fp32 weights before quantizing them) is reported apart as ``load peak``.
- on CUDA also ``cuda peak``: ``torch.cuda.max_memory_allocated`` during the training steps (reset after
  loading), the number that decides whether a run fits on a consumer GPU.

The projection to a 1.5B (Qwen2.5-1.5B shape) and a 7B (Llama-2-7B shape) model multiplies the measured
bytes per parameter of each component (weights of quantized linear layers, other weights, and for
adapters their weights + gradients + AdamW state) by the parameter counts of those architectures, built
weightless on the meta device from their configs. It covers the static memory (weights, gradients,
optimizer state) only: activations, the rollout's KV cache and the allocator's slack come on top.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from proc_memory import reset_peak, rss_kib  # benchmarks/ is on sys.path when run as a script

CONFIGS = ("adamw_fp32", "adamw8bit", "int8_lora", "nf4_lora")
LORA_RANK = 16
GiB = 2**30
MiB = 2**20


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of every tensor reachable in ``obj`` (dicts, lists, tuples, QuantState), storages counted once."""
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return 0
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "absmax") and hasattr(obj, "code"):  # a bitsandbytes QuantState
        return sum(_tensor_bytes(getattr(obj, k, None), seen) for k in ("absmax", "code", "offset", "state2"))
    return 0


def _model_bytes(model) -> dict[str, int]:
    """Weight bytes split into quantized linear layers / adapters / everything else (storages once)."""
    seen: set[int] = set()
    out = {"quantized": 0, "adapter": 0, "other": 0}
    for name, p in model.named_parameters():
        kind = "adapter" if p.requires_grad and "lora_" in name else "other"
        if type(p).__name__ in ("Params4bit", "Int8Params"):
            kind = "quantized"
        n = _tensor_bytes(p, seen)
        if kind == "quantized":
            n += _tensor_bytes(getattr(p, "quant_state", None), seen)  # 4-bit: block scales, code book
            n += _tensor_bytes(getattr(p, "SCB", None), seen)  # 8-bit: per-row scales
        out[kind] += n
    for module in model.modules():  # 8-bit layers may keep their scales on the module's state
        state = getattr(module, "state", None)
        if state is not None and hasattr(state, "SCB"):
            out["quantized"] += _tensor_bytes(state.SCB, seen)
    out["other"] += sum(_tensor_bytes(b, seen) for b in model.buffers())
    return out


def worker(args: argparse.Namespace) -> dict:
    """Run one configuration in this (fresh) process."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    import drpo_lightning.logprobs as logprobs
    from drpo_lightning.models import LoRA, Quantization, load_policy, package_available

    # Every configuration imports the same libraries and warms up autograd before the baseline is taken,
    # so the peaks differ by what the configurations allocate, not by which libraries they pulled in.
    if package_available("bitsandbytes"):
        import bitsandbytes  # noqa: F401
    if package_available("peft"):
        import peft  # noqa: F401
    warm = torch.nn.Linear(8, 8)
    warm(torch.randn(2, 8)).sum().backward()
    torch.optim.AdamW(warm.parameters()).step()
    del warm

    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    base = rss_kib("VmRSS") * 1024

    quant = lora = None
    kwargs: dict = {}
    if args.config == "int8_lora":
        quant, lora = Quantization(bits=8), LoRA(r=LORA_RANK, alpha=2 * LORA_RANK)
    elif args.config == "nf4_lora":
        quant, lora = Quantization(bits=4), LoRA(r=LORA_RANK, alpha=2 * LORA_RANK)
    if quant is not None:
        kwargs["dtype"] = torch.bfloat16  # non-quantized weights in bf16, as on a GPU
    t0 = time.perf_counter()
    policy = load_policy(args.model_dir, model_kwargs=kwargs, quantization=quant, lora=lora)
    if quant is None:
        policy.to(device)  # quantized weights are already on the CUDA device when there is one
    load_seconds = time.perf_counter() - t0
    load_peak = rss_kib("VmHWM") * 1024 - base
    resident = rss_kib("VmRSS") * 1024 - base
    params = [p for p in policy.parameters() if p.requires_grad]
    if args.config == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    reset = reset_peak()

    vocab = policy.config.vocab_size if hasattr(policy, "config") else args.vocab
    ids = torch.randint(4, vocab, (args.batch, args.prompt + args.tokens), device=device)
    mask = torch.ones_like(ids)
    advantages = torch.randn(args.batch, 1, device=device)
    state_bytes = grad_bytes = 0
    times = []
    for step in range(args.steps):
        t = time.perf_counter()
        stats = logprobs.policy_token_stats(policy, ids, mask, args.prompt, chunk_size=256)
        loss = -(advantages * stats.logprobs).mean() - 0.01 * stats.entropy.mean()
        loss.backward()
        if step == 0:
            grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if step == 0:
            state_bytes = _tensor_bytes(list(optimizer.state.values()), set())
    hwm = rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weights = _model_bytes(policy)
    result = {
        "config": args.config,
        "total_params": sum(p.numel() for p in policy.parameters()),
        "trainable_params": sum(p.numel() for p in params),
        "optimizer_state_bytes": int(state_bytes),
        "grad_bytes": int(grad_bytes),
        "weight_bytes": weights,
        "resident_after_load_bytes": int(resident),
        "load_peak_bytes": int(load_peak),
        "peak_bytes": int(hwm * 1024 - base),
        "peak_reset": reset,
        "load_seconds": load_seconds,
        "step_seconds": min(times[1:] or times),
        "loss": float(loss),
    }
    if cuda:
        result["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        result["cuda_weights_bytes"] = int(cuda_base)
    return result


def spawn(args: argparse.Namespace, config: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, "--model-dir", args.model_dir]
    for key in ("device", "batch", "prompt", "tokens", "steps"):
        cmd += [f"--{key}", str(getattr(args, key))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_model(path: str, smoke: bool) -> None:
    """The benchmark model, saved to ``path`` (random weights, fp32, nothing downloaded)."""
    from drpo_lightning.tiny import build_tiny_llama

    if smoke:
        sizes = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192)
    else:  # ~36M parameters; 8-bit/4-bit weights need in_features divisible by the block size (64)
        sizes = dict(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536)
    model = build_tiny_llama(**sizes, max_position_embeddings=1024, tie_word_embeddings=False, seed=0)
    model.save_pretrained(path)


def architecture_counts(kind: str) -> dict[str, int]:
    """Parameter counts of a target architecture (built on the meta device from its shape, no weights):
    quantizable linear weights, other weights, and the rank-16 all-linear LoRA adapter parameters."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if kind == "1.5B":  # Qwen2.5-1.5B
        config = Qwen2Config(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
    else:  # Llama-2-7B
        config = LlamaConfig(vocab_size=32_000, hidden_size=4096, intermediate_size=11_008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = adapters = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linear += module.weight.numel()
            adapters += LORA_RANK * (module.in_features + module.out_features)
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    return {"total": total, "linear": linear, "other": total - linear, "adapters": adapters}


def project(results: dict[str, dict], counts: dict[str, int]) -> dict[str, float]:
    """Static bytes (weights + gradients + optimizer state) of each configuration for a target model."""
    out = {}
    for name, r in results.items():
        w = r["weight_bytes"]
        if w["adapter"] == 0:  # full fine-tuning: everything per parameter
            per_param = (w["quantized"] + w["adapter"] + w["other"] + r["grad_bytes"]
                         + r["optimizer_state_bytes"]) / r["total_params"]
            out[name] = counts["total"] * per_param
            continue
        lin = r["bench_counts"]["linear"]
        other = r["bench_counts"]["total"] - lin  # (total_params counts packed 4-bit elements, not weights)
        per_linear = w["quantized"] / lin
        per_other = w["other"] / other
        per_adapter = (w["adapter"] + r["grad_bytes"] + r["optimizer_state_bytes"]) / r["trainable_params"]
        out[name] = counts["linear"] * per_linear + counts["other"] * per_other + counts["adapters"] * per_adapter
    return out


def bench_counts(path: str) -> dict[str, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return {"linear": linear, "total": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, B=2 x T=16, 2 steps (~1 min: imports)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda also reports torch.cuda peak memory)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--tokens", type=int, default=96, help="completion tokens per sequence")
    p.add_argument("--steps", type=int, default=3, help="training steps per configuration")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset (adamw_fp32 always runs)")
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.config = args.worker
        print(json.dumps(worker(args)))
        return 0
    if args.smoke:
        args.batch, args.prompt, args.tokens, args.steps = 2, 8, 8, 2
    configs = [c for c in args.configs.split(",") if c]
    if "adamw_fp32" not in configs:
        configs.insert(0, "adamw_fp32")

    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        args.model_dir = tmp
        build_model(tmp, args.smoke)
        counts = bench_counts(tmp)
        import torch

        print(
            f"model: Llama-shaped, {counts['total'] / 1e6:.1f}M parameters ({counts['linear'] / 1e6:.1f}M in "
            f"linear layers); batch {args.batch} x ({args.prompt} prompt + {args.tokens} completion) tokens, "
            f"{args.steps} steps; device {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        results = {}
        for config in configs:
            results[config] = spawn(args, config)
            results[config]["bench_counts"] = counts

    ref = results["adamw_fp32"]
    cuda = "cuda_peak_bytes" in ref
    header = (f"{'config':<11} {'trainable':>10} {'opt state MiB':>13} {'x fp32':>7} {'weights MiB':>11} "
              f"{'peak MiB':>9} {'x fp32':>7} {'load peak MiB':>13} {'s/step':>7}")
    if cuda:
        header += f" {'cuda peak MiB':>13} {'x fp32':>7}"
    print(header)
    for name, r in results.items():
        w = sum(r["weight_bytes"].values())
        line = (
            f"{name:<11} {r['trainable_params'] / 1e6:>9.2f}M {r['optimizer_state_bytes'] / MiB:>13.2f} "
            f"{r['optimizer_state_bytes'] / ref['optimizer_state_bytes']:>7.3f} {w / MiB:>11.1f} "
            f"{r['peak_bytes'] / MiB:>9.1f} {r['peak_bytes'] / ref['peak_bytes']:>7.3f} "
            f"{r['load_peak_bytes'] / MiB:>13.1f} {r['step_seconds']:>7.2f}"
        )
        if cuda:
            line += f" {r['cuda_peak_bytes'] / MiB:>13.1f} {r['cuda_peak_bytes'] / ref['cuda_peak_bytes']:>7.3f}"
        print(line)
    if not cuda:
        print("(no CUDA device: CUDA peak memory not measured; run with --device cuda on a GPU)")
    if not all(r["peak_reset"] for r in results.values()):
        print("note: /proc/self/clear_refs was refused: peaks are lifetime peaks (loading included)")

    holds = True
    if "adamw8bit" in results:
        ratio = results["adamw8bit"]["optimizer_state_bytes"] / ref["optimizer_state_bytes"]
        holds = ratio <= 0.3
        print(f"AdamW8bit optimizer state = {ratio:.3f}x fp32 AdamW: <= 0.3x {'holds' if holds else 'DOES NOT hold'}")

    print("\nprojected static memory (weights + gradients + optimizer state; activations and KV cache extra), GiB:")
    targets = {kind: architecture_counts(kind) for kind in ("1.5B", "7B")}
    print(f"{'config':<11} " + " ".join(f"{k + ' (' + format(c['total'] / 1e9, '.2f') + 'B)':>16}"
                                        for k, c in targets.items()))
    projections = {kind: project(results, c) for kind, c in targets.items()}
    for name in results:
        print(f"{name:<11} " + " ".join(f"{projections[k][name] / GiB:>16.1f}" for k in targets))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "targets": targets, "projections": projections}, f, indent=2)
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
