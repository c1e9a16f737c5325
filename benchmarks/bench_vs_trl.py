"""Tokens/s and peak memory of one RL step: drpo-lightning vs TRL's GRPOTrainer vs a bare PyTorch loop.

    python benchmarks/bench_vs_trl.py                  # ~1M and ~10M parameter Llama on CPU (~10 minutes)
    python benchmarks/bench_vs_trl.py --sizes 1m       # one size
    python benchmarks/bench_vs_trl.py --smoke          # tiny model, few steps, < 60 s (CI)
    python benchmarks/bench_vs_trl.py --device cuda --model qwen2.5-0.5b-shape   # GPU figures (+ MFU)
    python benchmarks/bench_vs_trl.py --threads 2      # whole 2-core machine, + async rollouts (bench_threads.py)

Needs the ``bench`` extra (``pip install -e ".[bench]"``: TRL, psutil); TRL is never a runtime dependency.
Nothing is downloaded: one randomly initialised model is built from a config (:mod:`drpo_lightning.tiny`,
character tokenizer), saved once to a temporary folder and loaded from that path by all three contenders.

The workload is the same for all three. Every step: ``B`` prompts (``"a+b="``, two-digit operands, so every
prompt has the same length and no contender pays for padding), ``G`` samples per prompt, exactly ``T`` new
tokens per sample (``min_new_tokens = max_new_tokens``: EOS can never be sampled, so each step has exactly
``B*G*T`` completion tokens), temperature 1, no top-k/top-p; a dense reward (share of the completion's
characters that are digits); GRPO advantages (group mean / unbiased group std + 1e-4, TRL's
epsilon); the clipped PPO/GRPO surrogate with epsilon 0.2 on both sides aggregated as the token mean over the
batch (TRL ``loss_type="dapo"``, its default: the sum over the batch's valid tokens divided by their number;
with one process and no gradient accumulation this *is* drpo-lightning's ``loss_agg_mode="token-mean"``);
beta = 0 (no reference model); one update per rollout (TRL ``num_iterations=1``; here ``ppo_epochs=1``,
``num_minibatches=1``); gradient clipping at 1.0; AdamW (lr 1e-5, no weight decay, constant schedule, the
fused kernel: TRL's default ``optim``, checked to be the same in all three);
float32 weights (bf16 autocast on CUDA); dropout off; no gradient checkpointing (TRL's config turns it on by
default: it is turned off so both do the same work); the same seed and ``torch.set_num_threads``.

The contenders:

- drpo-lightning: :class:`~drpo_lightning.module.RLModule` (``PPO`` objective, ``HFRollout`` with
  ``min_new_tokens``, behaviour-policy anchor) driven by a ``lightning.Trainer``: the real product path.
- TRL: ``GRPOTrainer`` with the configuration above (its ``transformers.generate`` rollout path).
- bare: about 60 lines of plain PyTorch + ``transformers`` (``generate``, score, one update; no framework, no
  metrics): the floor for framework overhead.

**Equivalence check** (first, at every size): drpo-lightning samples one rollout with its own engine; the
same token ids are then replayed through TRL's real pipeline (a ``GRPOTrainer`` subclass whose generation
returns the stored completions; it first asserts that TRL tokenised the prompts to the same ids). Both then
run one real training step. Compared: the advantages, the training-forward log-probs of every completion
token, the loss, the pre-clip gradient norm and the gradient of every parameter at the optimizer step. With
``num_iterations=1`` TRL's ratio is exactly 1 (it uses its own detached log-probs as the anchor), while
drpo-lightning's is pi/mu with mu recorded while sampling, equal up to float32 noise (~1e-6): the gradients
must agree to that precision. (The loss itself is -mean(A) up to that noise, about 0 for both, because GRPO
advantages sum to zero within each group and all completions have the same length: the gradient is the
meaningful comparison.)

**Timing.** All three run in one process, alternating in rounds (drpo-lightning, TRL, bare, then again), each
round a fresh ``fit``/``train`` call of ``--steps-per-round`` steps on the same model and optimizer. A step's
time is the wall time between the ends of two consecutive steps, taken by a callback (Lightning
``on_train_batch_end``, TRL ``on_step_end``; after each bare step): it includes data loading, logging and
every other per-step cost of the framework. The first step of each round and ``--warmup`` steps before the
first round are not counted. Reported: the median step time, tokens/s = ``B*G*T`` / median step time, and
the ratios.

**Memory.** Each contender also runs alone in a fresh subprocess (``--worker``): peak RSS of the whole process
(``VmHWM``, what the OS sees, imports included) and the peak above the RSS after the imports (model, data,
optimizer state and activations). On CUDA: ``torch.cuda.max_memory_allocated``.

**--threads N (N >= 2).** A different set of contenders, each given the whole N-core machine: TRL, the bare
loop and drpo-lightning synchronous with N threads, drpo-lightning with asynchronous rollouts (``worker``
rollout, ``max_staleness`` 0, 1, 2; trainer on N-1 cores, worker on 1) and drpo-lightning synchronous on N-1
threads (the baseline of the overlap line). Same timing method; no memory or profile part. See
``bench_threads.py`` beside this file.

**Profile.** A few more drpo-lightning steps with its methods wrapped in ``perf_counter`` timers (CUDA is
synchronised around each): where a step goes (rollout, rewards, log-prob forward, backward, optimizer,
metrics logging, other module code, Lightning's loop).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------------------------------- workload

MODELS: dict[str, dict[str, Any]] = {
    "smoke": dict(arch="llama", hidden=32, layers=2, heads=2),
    "1m": dict(arch="llama", hidden=128, layers=4, heads=4),  # 1.05M parameters
    "10m": dict(arch="llama", hidden=256, layers=10, heads=4),  # 10.5M parameters
    # Qwen2.5-0.5B's shape with random weights (GPU only; the character tokenizer decodes only ids < 21).
    "qwen2.5-0.5b-shape": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                               vocab=151936, max_positions=32768, rope_theta=1e6),
}

# Dense (fp32 non-tensor-core / bf16 tensor-core) peak FLOP/s for MFU; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": (66.9, 989.4), "H100": (66.9, 989.4), "A100": (19.5, 312.0), "L40S": (91.6, 362.1),
               "L4": (30.3, 121.0), "A10": (31.2, 125.0)}


@dataclasses.dataclass
class Workload:
    model: str = "1m"
    prompts: int = 8  # B
    group: int = 8  # G
    new_tokens: int = 16  # T
    lr: float = 1e-5
    clip: float = 0.2
    max_grad_norm: float = 1.0
    seed: int = 0
    threads: int = 1
    device: str = "cpu"

    @property
    def spec(self) -> dict[str, Any]:
        return MODELS[self.model]

    @property
    def tokens_per_step(self) -> int:
        return self.prompts * self.group * self.new_tokens

    @property
    def bf16(self) -> bool:
        return self.device == "cuda"


def build_model_dir(w: Workload, root: Path) -> tuple[str, int]:
    """Save the tokenizer and a randomly initialised model to ``root/model``; return (path, #params)."""
    from drpo_lightning.tiny import build_char_tokenizer, build_tiny_model

    spec = w.spec
    tokenizer = build_char_tokenizer(model_max_length=spec.get("max_positions", 64))
    if spec["arch"] == "qwen2" and "vocab" in spec:
        from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(w.seed)
        config = Qwen2Config(
            vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
            num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
            num_key_value_heads=spec["kv_heads"], max_position_embeddings=spec["max_positions"],
            rope_theta=spec["rope_theta"], tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = Qwen2ForCausalLM(config).float()
        model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id,
                                                   bos_token_id=tokenizer.bos_token_id,
                                                   eos_token_id=tokenizer.eos_token_id)
    else:
        model = build_tiny_model(spec["arch"], tokenizer, hidden_size=spec["hidden"], num_layers=spec["layers"],
                                 num_heads=spec["heads"], max_position_embeddings=64, seed=w.seed)
    path = root / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), sum(p.numel() for p in model.parameters())


def write_prompts(root: Path, seed: int, n: int = 2048) -> str:
    """``n`` prompts ``"a+b="`` with two-digit a, b (all 6 characters), shuffled by ``seed``, as JSONL."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    path = root / "prompts.jsonl"
    with path.open("w") as f:
        for a, b in pairs[:n]:
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return str(path)


def read_prompts(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def digit_reward(prompts, completions, **_):
    """Share of a completion's characters that are digits: dense, so the advantages are not all 0."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def adamw(params, lr: float):
    # fused=True: the optimizer TRL builds by default (transformers' optim="adamw_torch_fused"). Without it the
    # drpo-lightning and bare contenders ran torch's per-tensor loop, 2.9x slower than TRL's fused kernel
    # here (19.2 vs 6.7 ms a step at 10m); optimizer_settings() checks that all three match.
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


def optimizer_settings(optimizer: torch.optim.Optimizer) -> tuple:
    """Class and per-group hyperparameters of an optimizer (unwrapping accelerate's wrapper), for comparison."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "fused")
    groups = {tuple((k, g.get(k)) for k in keys) for g in optimizer.param_groups}
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    return type(optimizer).__name__, tuple(sorted(groups, key=repr)), n_params


# ---------------------------------------------------------------------------------------------- contenders


class DrpoRunner:
    """RLModule driven by a Lightning Trainer; one ``fit`` per round (same module, model and data)."""

    name = "drpo-lightning"

    def __init__(self, w: Workload, model_dir: str, data_path: str, *, shuffle: bool = True,
                 rollout=None, advantage=None) -> None:
        import lightning.pytorch as pl

        from drpo_lightning.advantages.grpo import GRPOAdvantage
        from drpo_lightning.data import PromptDataModule
        from drpo_lightning.module import RLModule
        from drpo_lightning.objectives.ppo import PPO
        from drpo_lightning.rewards.base import RewardFunction
        from drpo_lightning.rollouts.hf import HFRollout

        class DigitReward(RewardFunction):
            def __call__(self, *, prompts, completions, **columns):
                return digit_reward(prompts, completions, **columns)

        class Timer(pl.Callback):
            def __init__(self) -> None:
                self.stamps: list[float] = []

            def on_train_batch_end(self, *args: Any) -> None:
                sync(w.device)
                self.stamps.append(time.perf_counter())

        self.w = w
        self.pl = pl
        self.timer = Timer()
        self.extra_callbacks: list[Any] = []
        self.root = tempfile.mkdtemp(prefix="drpo_bench_")
        self.module = RLModule(
            model_name_or_path=model_dir,
            objective=PPO(clip_low=w.clip, clip_high=w.clip, loss_agg_mode="token-mean"),
            rollout=rollout or HFRollout(max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens),
            rewards=[DigitReward()],
            advantage=advantage or GRPOAdvantage(epsilon=1e-4),
            num_generations=w.group,
            ppo_epochs=1,
            num_minibatches=1,
            anchor="behavior",
            kl_beta=0.0,
            entropy_coef=0.0,
            max_grad_norm=w.max_grad_norm,
            export_dir="",
            optimizer=functools.partial(adamw, lr=w.lr),
        )
        self.data = PromptDataModule(path=data_path, batch_size=w.prompts, val_fraction=0.0, seed=w.seed,
                                     shuffle=shuffle)
        self.trainer = None

    def run(self, steps: int) -> list[float]:
        self.timer.stamps = []
        self.trainer = self.pl.Trainer(
            accelerator="gpu" if self.w.device == "cuda" else "cpu", devices=1,
            precision="bf16-mixed" if self.w.bf16 else "32-true", max_steps=steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=self.root,
            callbacks=[self.timer, *self.extra_callbacks],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer.fit(self.module, datamodule=self.data)
        return list(self.timer.stamps)

    @property
    def model(self) -> torch.nn.Module:
        return self.module.policy


class TrlRunner:
    """TRL's GRPOTrainer with the matched configuration; one ``train()`` per round (same model/optimizer)."""

    name = "TRL"

    def __init__(self, w: Workload, model_dir: str, data_path: str, *, shuffle: bool = True,
                 trainer_class=None, extra_callbacks=()) -> None:
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        class Timer(TrainerCallback):
            def __init__(self) -> None:
                self.stamps: list[float] = []

            def on_step_end(self, args, state, control, **kwargs):
                sync(w.device)
                self.stamps.append(time.perf_counter())

        self.w = w
        self.name = f"TRL {trl.__version__}"
        self.timer = Timer()
        self.root = tempfile.mkdtemp(prefix="trl_bench_")
        args = trl.GRPOConfig(
            output_dir=self.root,
            per_device_train_batch_size=w.prompts * w.group,  # TRL counts completions, not prompts
            gradient_accumulation_steps=1,
            num_generations=w.group,
            max_completion_length=w.new_tokens,
            generation_kwargs={"min_new_tokens": w.new_tokens},
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            num_iterations=1,
            loss_type="dapo",  # token mean over the batch == drpo-lightning "token-mean" (one process, no accumulation)
            epsilon=w.clip,
            epsilon_high=w.clip,
            scale_rewards="group",
            learning_rate=w.lr,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            max_grad_norm=w.max_grad_norm,
            bf16=w.bf16,
            fp16=False,
            use_cpu=w.device == "cpu",
            gradient_checkpointing=False,
            disable_dropout=True,
            shuffle_dataset=shuffle,
            seed=w.seed,
            max_steps=1,
            logging_steps=1,  # metrics every step, like RLModule's self.log
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            log_completions=False,
        )
        cls = trainer_class or trl.GRPOTrainer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer = cls(model=model_dir, reward_funcs=[digit_reward], args=args,
                               train_dataset=Dataset.from_list(read_prompts(data_path)),
                               callbacks=[self.timer, *extra_callbacks])
        for callback in (PrinterCallback, ProgressCallback):  # no printing of the per-step logs
            self.trainer.remove_callback(callback)

    def run(self, steps: int) -> list[float]:
        self.timer.stamps = []
        self.trainer.args.max_steps = steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer.train()
        return list(self.timer.stamps)

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model


class BareLoop:
    """The same work in plain PyTorch + transformers: generate, score, one clipped-surrogate update."""

    name = "bare PyTorch"

    def __init__(self, w: Workload, model_dir: str, data_path: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.w, self.rows, self.rng = w, read_prompts(data_path), random.Random(w.seed)
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(w.device)
        self.opt = adamw(self.model.parameters(), w.lr)
        self.gen = GenerationConfig(do_sample=True, max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens,
                                    temperature=1.0, top_k=0, top_p=1.0, pad_token_id=self.tok.pad_token_id,
                                    eos_token_id=self.tok.eos_token_id)

    def step(self) -> None:
        w, tok, model = self.w, self.tok, self.model
        rows = self.rng.sample(self.rows, w.prompts)
        enc = tok([r["prompt"] for r in rows], padding=True, return_tensors="pt").to(w.device)
        prompt_ids = enc.input_ids.repeat_interleave(w.group, 0)  # [N, P]
        prompt_mask = enc.attention_mask.repeat_interleave(w.group, 0)
        autocast = torch.autocast(w.device, dtype=torch.bfloat16, enabled=w.bf16)
        model.eval()
        with torch.no_grad(), autocast:
            seq = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.gen)
        model.train()
        completion = seq[:, prompt_ids.shape[1]:]  # [N, T]
        is_eos = completion == tok.eos_token_id
        mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
        texts = tok.batch_decode(completion.masked_fill(~mask, tok.pad_token_id), skip_special_tokens=True)
        rewards = torch.tensor(digit_reward(None, texts), device=w.device).view(w.prompts, w.group)
        adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
        adv = adv.reshape(-1, 1)  # [N, 1]
        attention = torch.cat([prompt_mask, mask.long()], 1)
        position_ids = (attention.cumsum(1) - 1).clamp(min=0)
        with autocast:
            logits = model(input_ids=seq, attention_mask=attention, position_ids=position_ids,
                           logits_to_keep=w.new_tokens + 1).logits[:, :-1]  # [N, T, V]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logp - logp.detach())  # on-policy: 1, with the policy gradient
        token_loss = -torch.minimum(ratio * adv, ratio.clamp(1 - w.clip, 1 + w.clip) * adv)
        loss = (token_loss * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), w.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, steps: int) -> list[float]:
        stamps = []
        for _ in range(steps):
            self.step()
            sync(self.w.device)
            stamps.append(time.perf_counter())
        return stamps


def make_runner(kind: str, w: Workload, model_dir: str, data_path: str):
    return {"drpo": DrpoRunner, "trl": TrlRunner, "bare": BareLoop}[kind](w, model_dir, data_path)


# --------------------------------------------------------------------------------------- equivalence check


def _param_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[name.removeprefix("module.")] = p.grad.detach().float().cpu().clone()
    return out


def check_equivalence(w: Workload, model_dir: str, data_path: str) -> dict[str, Any]:
    """Feed one drpo-lightning rollout to TRL's pipeline; compare advantages, log-probs, loss and gradients."""
    import lightning.pytorch as pl
    from transformers import TrainerCallback

    from drpo_lightning.advantages.grpo import GRPOAdvantage
    from drpo_lightning.rollouts.hf import HFRollout

    class RecordingRollout(HFRollout):
        stored = None

        def generate(self, *args, **kwargs):
            if self.stored is None:
                self.stored = super().generate(*args, **kwargs)
            return self.stored

    class RecordingAdvantage(GRPOAdvantage):
        value = None

        def __call__(self, rewards, group_ids):
            self.value = super().__call__(rewards, group_ids)
            return self.value

    class GradCapture(pl.Callback):
        grads = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = {k.removeprefix("policy."): v for k, v in _param_grads(pl_module).items()}

    rollout = RecordingRollout(max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens)
    advantage = RecordingAdvantage(epsilon=1e-4)
    torch.manual_seed(w.seed)
    drpo = DrpoRunner(w, model_dir, data_path, shuffle=False, rollout=rollout, advantage=advantage)
    capture = GradCapture()
    drpo.extra_callbacks = [capture]
    drpo_logps: dict[int, torch.Tensor] = {}  # rollout row -> [T] log-probs of the training forward
    original_stats = drpo.module._token_stats

    def stats_and_record(model, rollout, rows, *args, **kwargs):
        out = original_stats(model, rollout, rows, *args, **kwargs)
        if torch.is_grad_enabled():  # RLModule visits the rows in a random order
            for row, lp in zip(rows.tolist(), out.logprobs.detach().float().cpu()):
                drpo_logps[row] = lp
        return out

    drpo.module._token_stats = stats_and_record
    drpo.run(1)
    del drpo.module._token_stats
    metrics = drpo.trainer.callback_metrics
    stored = rollout.stored
    completions = [row[m.bool()].tolist() for row, m in zip(stored.completion_ids.cpu(), stored.completion_mask.cpu())]
    prompts = [row[m.bool()].tolist() for row, m in zip(stored.prompt_ids.cpu(), stored.prompt_mask.cpu())]

    import trl

    seen: dict[str, Any] = {}

    class ReplayGRPOTrainer(trl.GRPOTrainer):
        """TRL's pipeline with generation replaced by drpo-lightning's stored completions."""

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            if [list(p) for p in prompt_ids] != prompts:
                raise AssertionError("TRL tokenised the prompts differently from drpo-lightning")
            return [list(c) for c in completions], None

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            seen["advantages"] = out["advantages"].detach().float().cpu()
            return out

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if torch.is_grad_enabled():
                seen["logps"] = out[0].detach().float().cpu()
            return out

        def _compute_loss(self, model, inputs):
            # TRL shuffles the rollout's rows before the update: keep its row order to match them up.
            seen["rows"] = [
                (tuple(p[pm.bool()].tolist()), tuple(c[cm.bool()].tolist()))
                for p, pm, c, cm in zip(inputs["prompt_ids"].cpu(), inputs["prompt_mask"].cpu(),
                                        inputs["completion_ids"].cpu(), inputs["completion_mask"].cpu())
            ]
            loss = super()._compute_loss(model, inputs)
            seen["loss"] = float(loss.detach())
            return loss

    class TrlGradCapture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen["grads"] = _param_grads(model)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "grad_norm" in logs:
                seen["grad_norm"] = float(logs["grad_norm"])

    torch.manual_seed(w.seed)
    trl_runner = TrlRunner(w, model_dir, data_path, shuffle=False, trainer_class=ReplayGRPOTrainer,
                           extra_callbacks=[TrlGradCapture()])
    trl_runner.run(1)

    a_drpo = advantage.value.detach().float().cpu()
    # Row i of TRL's update is any stored row with the same prompt and completion (duplicates score alike).
    index = {(tuple(p), tuple(c)): i for i, (p, c) in enumerate(zip(prompts, completions))}
    order = [index[key] for key in seen["rows"]]
    lp_drpo = torch.stack([drpo_logps[i] for i in order])  # [N, T] in TRL's row order
    g_drpo, g_trl = capture.grads, seen["grads"]
    names = sorted(set(g_drpo) & set(g_trl))
    if not names or set(g_drpo) != set(g_trl):
        raise AssertionError(f"parameter names differ: {sorted(set(g_drpo) ^ set(g_trl))[:5]}")
    flat_drpo = torch.cat([g_drpo[n].flatten() for n in names])
    flat_trl = torch.cat([g_trl[n].flatten() for n in names])
    grad_rel = float((flat_drpo - flat_trl).abs().max() / flat_trl.abs().max().clamp(min=1e-30))
    cosine = float(torch.nn.functional.cosine_similarity(flat_drpo.double(), flat_trl.double(), dim=0))
    result = {
        "rows": len(completions),
        "advantage_std": float(a_drpo.std()),
        "advantage_max_abs_diff": float((a_drpo - seen["advantages"]).abs().max()),
        "logprob_max_abs_diff": float((lp_drpo - seen["logps"]).abs().max()),
        "loss_drpo": float(metrics["train/loss"]),
        "loss_trl": seen["loss"],
        "grad_norm_drpo": float(metrics["train/grad_norm"]),
        "grad_norm_trl": seen.get("grad_norm", float("nan")),
        "grad_max_rel_diff": grad_rel,
        "grad_cosine": cosine,
    }
    result["ok"] = (
        result["advantage_std"] > 0.1
        and result["advantage_max_abs_diff"] < 1e-4
        and result["logprob_max_abs_diff"] < 1e-4
        and abs(result["loss_drpo"] - result["loss_trl"]) < 1e-4
        and abs(result["grad_norm_drpo"] - result["grad_norm_trl"]) <= 1e-3 * max(result["grad_norm_trl"], 1e-6)
        and grad_rel < 1e-3
        and cosine > 0.99999
    )
    return result


# ------------------------------------------------------------------------------------------ step profile


class StepProfile:
    """Wrap RLModule methods (on the instance) in perf_counter timers; per-step totals per component."""

    COMPONENTS = (
        ("rollout (generate)", "_generate"),
        ("rewards (decode + score)", "_score"),
        ("log-prob forward", "_token_stats"),
        ("backward", "manual_backward"),
        ("optimizer (clip + step)", "_optimizer_update"),
        ("metrics logging", "_log_step"),
    )

    def __init__(self, runner: DrpoRunner) -> None:
        import lightning.pytorch as pl

        self.runner, self.device = runner, runner.w.device
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        profile = self

        class Stamp(pl.Callback):
            def on_train_batch_end(self, *args: Any) -> None:
                profile.steps.append(dict(profile.current))
                profile.current = {}

        self.callback = Stamp()

    def _wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.current[label] = self.current.get(label, 0.0) + time.perf_counter() - start

        return timed

    def run(self, steps: int) -> dict[str, float]:
        module = self.runner.module
        wrapped = [("training_step", "training_step"), *self.COMPONENTS]
        for label, attr in wrapped:
            if hasattr(module, attr):
                setattr(module, attr, self._wrap(label, getattr(module, attr)))
        self.runner.extra_callbacks = [self.callback]
        try:
            stamps = self.runner.run(steps + 1)
        finally:
            self.runner.extra_callbacks = []
            for _, attr in wrapped:
                module.__dict__.pop(attr, None)
        intervals = [b - a for a, b in zip(stamps, stamps[1:])]
        per_step = self.steps[1:]  # the first step of the round has no interval
        out: dict[str, float] = {}
        for label, _ in self.COMPONENTS:
            out[label] = statistics.median(s.get(label, 0.0) for s in per_step)
        inside = statistics.median(s["training_step"] - sum(s.get(lbl, 0.0) for lbl, _ in self.COMPONENTS)
                                   for s in per_step)
        out["other module code (encode, advantages, objective)"] = inside
        out["Lightning loop (data, hooks, between steps)"] = statistics.median(
            i - s["training_step"] for i, s in zip(intervals, per_step))
        out["step (median interval)"] = statistics.median(intervals)
        return out


# --------------------------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_mib(field: str = "VmRSS") -> float:
    kib = _proc_status_kib(field)
    if kib is None:  # not Linux: psutil (RSS) and ru_maxrss (peak)
        if field == "VmHWM":
            import resource

            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
        else:
            import psutil

            kib = psutil.Process().memory_info().rss // 1024
    return kib / 1024


def worker(kind: str, w: Workload, model_dir: str, data_path: str, steps: int) -> dict[str, Any]:
    """Run one contender alone in this (fresh) process: its peak memory and its own step times."""
    torch.set_num_threads(w.threads)
    # The baseline for "above imports" is taken after the libraries are really loaded. transformers and trl
    # import lazily (``import trl`` alone loads almost nothing), so name what each contender uses.
    import transformers.generation.utils  # noqa: F401  (all three load and sample the model through these)
    import transformers.modeling_utils  # noqa: F401

    if kind == "drpo":
        import lightning.pytorch  # noqa: F401

        import drpo_lightning.module  # noqa: F401
    elif kind == "trl":
        import datasets  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    after_imports = _rss_mib()
    torch.manual_seed(w.seed)
    runner = make_runner(kind, w, model_dir, data_path)
    if w.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    stamps = runner.run(steps)
    out = {
        "kind": kind,
        "peak_rss_mib": _rss_mib("VmHWM"),
        "rss_after_imports_mib": after_imports,
        "step_s": statistics.median(b - a for a, b in zip(stamps, stamps[1:])) if len(stamps) > 1 else None,
    }
    if w.device == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_before_steps_mib"] = base_cuda / 2**20
    return out


def measure_memory(kind: str, w: Workload, model_dir: str, data_path: str, steps: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--workload",
           json.dumps(dataclasses.asdict(w)), "--model-dir", model_dir, "--data", data_path,
           "--worker-steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------------ main


def flops_per_step(w: Workload, n_params: int, prompt_len: int) -> float:
    """Model FLOPs of one step (2 per parameter per token forward, 6 with backward; attention ignored)."""
    n = w.prompts * w.group
    generation = 2 * n_params * n * (prompt_len + w.new_tokens)
    training = 6 * n_params * n * (prompt_len + w.new_tokens)
    return float(generation + training)


def peak_flops(args: argparse.Namespace, w: Workload) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if w.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, (fp32, bf16) in PEAK_TFLOPS.items():
        if key in name:
            return (bf16 if w.bf16 else fp32) * 1e12
    return None


def summarise(stamps_per_round: list[list[float]]) -> list[float]:
    out = []
    for stamps in stamps_per_round:
        out.extend(b - a for a, b in zip(stamps, stamps[1:]))
    return out


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return min(xs), max(xs)
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def bench_size(args: argparse.Namespace, w: Workload, root: Path) -> dict[str, Any]:
    torch.set_num_threads(w.threads)
    model_dir, n_params = build_model_dir(w, root)
    data_path = write_prompts(root, w.seed)
    spec = w.spec
    print(f"\n== {w.model}: {spec['arch']} hidden {spec['hidden']}, {spec['layers']} layers, {n_params / 1e6:.2f}M "
          f"parameters; {w.prompts} prompts x {w.group} samples x {w.new_tokens} tokens = {w.tokens_per_step} "
          f"completion tokens/step; {'bf16 autocast' if w.bf16 else 'fp32'}, {w.device}, "
          f"{w.threads} thread(s)", flush=True)
    result: dict[str, Any] = {"model": w.model, "params": n_params, "workload": dataclasses.asdict(w)}

    if not args.skip_check:
        check = check_equivalence(w, model_dir, data_path)
        result["check"] = check
        print(f"check (one drpo-lightning rollout of {check['rows']} completions replayed through TRL): "
              f"advantages max|diff| {check['advantage_max_abs_diff']:.1e} (std {check['advantage_std']:.2f}); "
              f"log-probs max|diff| {check['logprob_max_abs_diff']:.1e}; loss {check['loss_drpo']:.2e} vs "
              f"{check['loss_trl']:.2e}; grad norm {check['grad_norm_drpo']:.6f} vs {check['grad_norm_trl']:.6f}; "
              f"grads max rel diff {check['grad_max_rel_diff']:.1e}, cosine {check['grad_cosine']:.8f} -> "
              f"{'OK' if check['ok'] else 'MISMATCH'}", flush=True)

    if w.threads >= 2:  # the whole-machine mode: other contenders, no memory or profile part
        from bench_threads import bench_threads

        classes = {"drpo": DrpoRunner, "trl": TrlRunner, "bare": BareLoop}
        return bench_threads(args, w, model_dir, data_path, result, classes, summarise, quartiles)

    torch.manual_seed(w.seed)
    runners = {"drpo": DrpoRunner(w, model_dir, data_path), "trl": TrlRunner(w, model_dir, data_path),
               "bare": BareLoop(w, model_dir, data_path)}
    names = {k: r.name for k, r in runners.items()}
    for runner in runners.values():  # warm-up, not counted
        runner.run(args.warmup)
    optimizers = {"drpo": runners["drpo"].trainer.optimizers[0], "trl": runners["trl"].trainer.optimizer,
                  "bare": runners["bare"].opt}
    settings = {k: optimizer_settings(o) for k, o in optimizers.items()}
    if len(set(settings.values())) != 1:
        raise SystemExit(f"the three contenders' optimizers differ: {settings}")
    name, groups, n_tensors = settings["drpo"]
    print(f"optimizer (all three): {name} {dict(groups[0])} over {n_tensors} tensors", flush=True)
    result["optimizer"] = {"class": name, "groups": [dict(g) for g in groups]}
    rounds: dict[str, list[list[float]]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for key, runner in runners.items():
            rounds[key].append(runner.run(args.steps_per_round + 1))
            if torch.get_num_threads() != w.threads:
                print(f"warning: {names[key]} changed torch's thread count to {torch.get_num_threads()}; reset")
                torch.set_num_threads(w.threads)
    times = {k: summarise(v) for k, v in rounds.items()}
    stats = {}
    for key, xs in times.items():
        med = statistics.median(xs)
        stats[key] = {"name": names[key], "steps": len(xs), "median_s": med, "iqr_s": quartiles(xs),
                      "tokens_per_s": w.tokens_per_step / med,
                      "round_medians_s": [statistics.median(summarise([r])) for r in rounds[key]]}
    result["timing"] = stats

    profile = StepProfile(runners["drpo"]).run(args.profile_steps)
    result["profile"] = profile
    del runners

    memory = {}
    if not args.skip_memory:
        for key in ("drpo", "trl", "bare"):
            memory[key] = measure_memory(key, w, model_dir, data_path, args.memory_steps)
    result["memory"] = memory

    # -- report --
    mem_col = "peak CUDA MiB" if w.device == "cuda" else "peak RSS MiB (above imports)"
    print(f"{'':16s} {'steps':>5s} {'step s median [IQR]':>24s} {'tokens/s':>9s}   {mem_col}")
    for key in ("bare", "trl", "drpo"):
        s = stats[key]
        lo, hi = s["iqr_s"]
        mem = memory.get(key)
        if mem is None:
            mem_text = "-"
        elif w.device == "cuda":
            mem_text = f"{mem['peak_cuda_mib']:.0f}"
        else:
            mem_text = f"{mem['peak_rss_mib']:.0f} ({mem['peak_rss_mib'] - mem['rss_after_imports_mib']:.0f})"
        print(f"{s['name']:16s} {s['steps']:5d} {s['median_s']:8.3f} [{lo:.3f}-{hi:.3f}] {s['tokens_per_s']:9.0f}"
              f"   {mem_text}")
    peak = peak_flops(args, w)
    if peak:
        prompt_len = 6
        for key in ("bare", "trl", "drpo"):
            mfu = flops_per_step(w, n_params, prompt_len) / stats[key]["median_s"] / peak
            stats[key]["mfu"] = mfu
            print(f"MFU {stats[key]['name']}: {100 * mfu:.1f}% (model FLOPs 8*params*tokens / peak "
                  f"{peak / 1e12:.0f} TFLOP/s)")

    speedup = stats["drpo"]["tokens_per_s"] / stats["trl"]["tokens_per_s"]
    overhead = stats["drpo"]["median_s"] / stats["bare"]["median_s"]
    paired = [d / t for d, t in zip(stats["trl"]["round_medians_s"], stats["drpo"]["round_medians_s"])]
    goals = {"tokens_per_s_vs_trl": (speedup, speedup >= 1.3), "step_vs_bare": (overhead, overhead <= 1.15)}
    print(f"drpo-lightning / TRL tokens/s: {speedup:.2f}x (per round {min(paired):.2f}-{max(paired):.2f}x); "
          f"goal >= 1.30x: {'MET' if speedup >= 1.3 else 'NOT MET'}")
    print(f"drpo-lightning / bare step time: {overhead:.3f}x; goal <= 1.15x: {'MET' if overhead <= 1.15 else 'NOT MET'}")
    print(f"TRL / bare step time: {stats['trl']['median_s'] / stats['bare']['median_s']:.3f}x")
    if memory:
        field = "peak_cuda_mib" if w.device == "cuda" else "peak_rss_mib"
        ratio = memory["drpo"][field] / memory["trl"][field]
        goals["peak_memory_vs_trl"] = (ratio, ratio <= 1.0)
        line = f"drpo-lightning / TRL peak memory: {ratio:.2f}x"
        if w.device != "cuda":
            above = ((memory["drpo"]["peak_rss_mib"] - memory["drpo"]["rss_after_imports_mib"])
                     / (memory["trl"]["peak_rss_mib"] - memory["trl"]["rss_after_imports_mib"]))
            line += f" (above imports: {above:.2f}x)"
        print(f"{line}; goal <= 1.0x: {'MET' if ratio <= 1.0 else 'NOT MET'}")
    result["goals"] = goals

    total = profile["step (median interval)"]
    print("where a drpo-lightning step goes (median over "
          f"{args.profile_steps} profiled steps, timers on; step {1000 * total:.1f} ms):")
    for label, value in profile.items():
        if label != "step (median interval)":
            print(f"  {label:52s} {1000 * value:8.1f} ms  {100 * value / total:5.1f}%")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=None, help="models to run (default: 1m 10m)")
    parser.add_argument("--model", default=None, help="one model (alias of --sizes MODEL), e.g. qwen2.5-0.5b-shape")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps (CI, < 60 s)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads for all three (default 1: a shared 2-core CPU is noisy); "
                             ">= 2: the whole-machine mode with asynchronous rollouts (bench_threads.py)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, default=6)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device for MFU")
    parser.add_argument("--json", default=None, help="write all results to this file")
    # internal: one contender alone in this process, for its peak memory
    parser.add_argument("--worker", choices=("drpo", "trl", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--worker-steps", type=int, default=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        w = Workload(**json.loads(args.workload))
        print("RESULT " + json.dumps(worker(args.worker, w, args.model_dir, args.data, args.worker_steps)))
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.threads >= 2 and args.device != "cpu":
        parser.error("--threads >= 2 (the whole-machine mode) shares out CPU cores: use it with --device cpu")
    sizes = [args.model] if args.model else (args.sizes or ["1m", "10m"])
    overrides: dict[str, Any] = {}
    if args.smoke:
        sizes = ["smoke"]
        overrides = dict(prompts=2, group=4, new_tokens=4)
        args.warmup, args.rounds, args.steps_per_round, args.profile_steps, args.memory_steps = 1, 1, 3, 2, 2
    unknown = [s for s in sizes if s not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    try:
        import trl
    except ImportError:
        parser.error('TRL is not installed: pip install -e ".[bench]"')
    print(f"torch {torch.__version__}, trl {trl.__version__}; device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f", {os.cpu_count()} CPU cores"))
    results = []
    for size in sizes:
        w = Workload(model=size, threads=args.threads, device=args.device, seed=0,
                     prompts=overrides.get("prompts", args.prompts), group=overrides.get("group", args.group),
                     new_tokens=overrides.get("new_tokens", args.new_tokens))
        with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
            results.append(bench_size(args, w, Path(tmp)))
    if args.threads >= 2:
        from bench_threads import print_goals

        print_goals(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.smoke:
        print("\n(smoke run: the ratios of a 4k-parameter model over 3 steps say nothing about performance)")
    bad = [r["model"] for r in results if "check" in r and not r["check"]["ok"]]
    if bad:
        print(f"equivalence check FAILED for {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
