"""Scale-out on CPU: 2-process DDP and FSDP2 runs equal the 1-process run; prompt sharding; FSDP configs.

The multi-process runs are subprocesses running tests/rl_helpers.py with ``Trainer(accelerator="cpu",
devices=2)`` (gloo), each rank with half of the global batch. Sampling randomness differs between 1 and 2
processes, so they use :class:`rl_helpers.DeterministicRollout` (completions a fixed function of the prompt,
behaviour log-probs from the policy's own forward pass) and a deterministic reward.

Why ``num_minibatches: 1``: the N = B x G completions of a step are split into minibatches by a random
permutation *of the rows each rank holds*; with 2 ranks each minibatch holds half of each rank's rows, which
is a different partition of the global batch than one process makes, so the parameters after the first of
several minibatch updates differ (both are valid). With one minibatch per update (any number of PPO epochs
and micro-batches) the update uses the whole global batch and must not depend on the number of ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rl_helpers import make_tiny_model, namespace, run
from torch.utils.data import DistributedSampler

from drpo_lightning.data import EpochShuffleSampler, PromptDataLoader, PromptDataset, collate_prompts
from drpo_lightning.distributed import DecoderLayerPolicy, decoder_layer_names

HELPER = Path(__file__).with_name("rl_helpers.py")
ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # 2 rollouts x 2 PPO epochs
COMMON = ["--steps", str(STEPS), "--ppo-epochs", "2", "--micro-batch-size", "4", "--lr", "1e-3",
          "--num-prompts", "24"]

requires_cuda = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


# ------------------------------------------------------------------------------------------ prompt sharding


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_see_the_single_process_batches(world):
    n, per_rank = 50, 4
    single = list(EpochShuffleSampler(n, seed=3))
    shards = [list(EpochShuffleSampler(n, seed=3, num_replicas=world, rank=r)) for r in range(world)]
    assert all(len(s) == n // world for s in shards)
    for step in range(len(shards[0]) // per_rank):
        union = sorted(i for s in shards for i in s[step * per_rank:(step + 1) * per_rank])
        assert union == sorted(single[step * world * per_rank:(step + 1) * world * per_rank])
    # Lightning leaves a DistributedSampler alone instead of wrapping it in DistributedSamplerWrapper.
    assert isinstance(EpochShuffleSampler(n), DistributedSampler)


def test_lightnings_own_wrapper_would_reshuffle_the_order():
    """Why the sampler shards itself: Lightning's DistributedSamplerWrapper (used for any other sampler in
    training, always with shuffle=True) permutes the positions again before taking rank::W, so the ranks'
    first batches are not the single process's first batch."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    n, per_rank, world = 64, 4, 2
    single = list(EpochShuffleSampler(n, seed=3))
    wrapped = [list(DistributedSamplerWrapper(EpochShuffleSampler(n, seed=3), num_replicas=world, rank=r,
                                              shuffle=True, seed=0)) for r in range(world)]
    union = sorted(i for s in wrapped for i in s[:per_rank])
    assert union != sorted(single[: world * per_rank])


def test_loader_resumes_mid_epoch_and_at_epoch_end():
    items = [{"prompt": f"p{i}"} for i in range(10)]

    def loader():
        return PromptDataLoader(PromptDataset(items), batch_size=3, sampler=EpochShuffleSampler(10, seed=1),
                                drop_last=True, collate_fn=collate_prompts)

    full = loader()
    epoch0 = [b["prompt"] for b in full]
    state = None
    first = loader()
    for i, _batch in enumerate(first):
        if i == 1:
            state = first.state_dict()
            break
    assert state == {"epoch": 0, "batches": 2}
    resumed = loader()
    resumed.load_state_dict(state)
    assert [b["prompt"] for b in resumed] == epoch0[2:]
    # A checkpoint after the last batch of epoch 0 resumes at the start of epoch 1.
    end = loader()
    end.load_state_dict({"epoch": 0, "batches": 3})
    end.sampler.set_epoch(1)
    full.sampler.set_epoch(1)
    assert [b["prompt"] for b in end] == [b["prompt"] for b in full]


# ------------------------------------------------------------------------------------- 1 vs 2 processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process run in-process; the DDP and FSDP2 runs as two subprocesses started in parallel."""
    tmp = tmp_path_factory.mktemp("dist")
    model_dir = make_tiny_model(tmp / "model")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for name in ("ddp", "fsdp2"):
        args = ["--model-dir", model_dir, "--out", str(tmp / name), "--strategy", name, "--devices", "2",
                "--batch-size", "2", *COMMON]
        if name == "fsdp2":
            args += ["--export-dir", str(tmp / "fsdp2_export")]
        procs[name] = subprocess.Popen([sys.executable, str(HELPER), *args], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = run(namespace(model_dir=model_dir, out=tmp / "single", batch_size=4, steps=STEPS, ppo_epochs=2,
                           micro_batch_size=4, lr=1e-3, num_prompts=24))
    outputs = {}
    for name, proc in procs.items():
        try:
            outputs[name] = proc.communicate(timeout=300)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, f"{name} run failed:\n{outputs[name][-4000:]}"
    return {"dir": tmp, "single": single, "outputs": outputs}


def test_ddp_on_two_processes_matches_one_process(runs):
    single = runs["single"]
    ddp = torch.load(runs["dir"] / "ddp" / "params.pt")
    assert set(ddp) == set(single["params"])
    for key, value in single["params"].items():
        torch.testing.assert_close(ddp[key], value, atol=1e-5, rtol=0)
    assert (runs["dir"] / "ddp" / "done").read_text() == str(STEPS)


def test_fsdp2_on_two_processes_matches_one_process_and_exports_a_plain_hf_folder(runs):
    from transformers import AutoModelForCausalLM

    export = runs["dir"] / "fsdp2_export"
    assert (export / "config.json").exists() and (export / "tokenizer.json").exists()
    assert yaml.safe_load((export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    exported = {k: v.float() for k, v in model.state_dict().items()}
    single = runs["single"]["params"]
    assert set(exported) == set(single)
    for key, value in single.items():
        torch.testing.assert_close(exported[key], value, atol=1e-5, rtol=0)
    # the run really trained: the exported weights are not the initial ones
    initial = AutoModelForCausalLM.from_pretrained(runs["dir"] / "model", local_files_only=True).state_dict()
    assert max((exported[k] - initial[k].float()).abs().max().item() for k in exported) > 1e-4


# ------------------------------------------------------------------------------------------ FSDP configs


def _tiny(arch):
    from drpo_lightning.tiny import build_char_tokenizer, build_tiny_model

    return build_tiny_model(arch, build_char_tokenizer(), hidden_size=32, num_layers=3, num_heads=2, seed=0)


def _decoder_layers(model, arch):
    return list(model.transformer.h) if arch == "gpt2" else list(model.model.layers)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_wrap_policy_selects_exactly_the_decoder_layers(arch):
    model = _tiny(arch)
    root = torch.nn.Module()  # stands for the LightningModule that FSDP wraps
    root.policy = model
    root.head = torch.nn.Linear(2, 2)
    layers = _decoder_layers(model, arch)
    assert decoder_layer_names(root) == {type(layers[0]).__name__}
    wrap = DecoderLayerPolicy()._run_policy(root, set(), {"k": 1})
    assert set(map(id, wrap)) == {id(m) for m in [*layers, model]}
    assert all(kwargs == {"k": 1} for kwargs in wrap.values())
    checkpointing = DecoderLayerPolicy(include_model=False)
    assert {id(m) for m in checkpointing._run_policy(root, set(), {})} == set(map(id, layers))
    # the legacy callable form (FSDP's recursive wrapping) agrees
    legacy = DecoderLayerPolicy(include_model=False)
    assert legacy(root, recurse=True, nonwrapped_numel=0)
    assert [m for m in root.modules() if legacy(m, recurse=False, nonwrapped_numel=0)] == layers


def test_wrap_policy_fails_clearly_without_a_hf_model():
    with pytest.raises(ValueError, match="no Hugging Face model with `_no_split_modules`"):
        DecoderLayerPolicy()._run_policy(torch.nn.Sequential(torch.nn.Linear(2, 2)), set(), {})


def _config(name):
    return yaml.safe_load((ROOT / "configs" / name).read_text())


@pytest.mark.parametrize("name", ["drpo_fsdp.yaml", "drpo_ddp.yaml"])
def test_scaling_configs_parse(name, capsys, tmp_path):
    from drpo_lightning.cli import main

    model_dir = make_tiny_model(tmp_path / "m")
    assert main(["fit", "--config", str(ROOT / "configs" / name), f"--model.model_name_or_path={model_dir}",
                 "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["devices"] == -1 and printed["trainer"]["accelerator"] == "gpu"
    assert printed["trainer"]["callbacks"][0]["class_path"] == "drpo_lightning.checkpoint.RLCheckpoint"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fsdp_config_builds_its_strategy_and_policies(arch):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy

    config = _config("drpo_fsdp.yaml")
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": config["trainer"]["strategy"]})).strategy
    assert type(strategy) is FSDPStrategy
    assert strategy._state_dict_type == "sharded"
    assert config["trainer"]["precision"] == "bf16-mixed"
    wrap = strategy.kwargs["auto_wrap_policy"]
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert isinstance(wrap, DecoderLayerPolicy) and wrap.include_model
    assert isinstance(checkpointing, DecoderLayerPolicy) and not checkpointing.include_model
    root = torch.nn.Module()
    root.policy = _tiny(arch)
    layers = _decoder_layers(root.policy, arch)
    assert {id(m) for m in checkpointing._run_policy(root, set(), {})} == set(map(id, layers))
    assert {id(m) for m in wrap._run_policy(root, set(), {})} == {id(m) for m in [*layers, root.policy]}


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@requires_cuda
def test_fsdp1_on_two_gpus_matches_one_process(tmp_path):  # pragma: no cover - needs GPUs
    model_dir = make_tiny_model(tmp_path / "m")
    single = run(namespace(model_dir=model_dir, out=tmp_path / "single", batch_size=4, steps=STEPS, ppo_epochs=2,
                           micro_batch_size=4, lr=1e-3, num_prompts=24))
    proc = subprocess.run([sys.executable, str(HELPER), "--model-dir", model_dir, "--out", str(tmp_path / "fsdp"),
                           "--strategy", "fsdp", "--devices", "2", "--batch-size", "2", *COMMON,
                           "--export-dir", str(tmp_path / "export")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").state_dict()
    for key, value in single["params"].items():
        torch.testing.assert_close(exported[key].float().cpu(), value, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- FSDP2: one gather per rollout


def _gather_count_rank(rank: int, model_dir: str, port: int, out: str) -> None:
    """One rank of a 2-process FSDP2 rollout through ``RLModule._generate``: all-gathers counted with and
    without :func:`drpo_lightning.distributed.gathered_once`."""
    import contextlib
    import json

    import torch.distributed as dist
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoTokenizer

    import drpo_lightning.distributed as distributed
    from drpo_lightning.models import disable_dropout, load_causal_lm
    from drpo_lightning.module import RLModule
    from drpo_lightning.rollouts.hf import HFRollout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    calls = []
    original = param_group.foreach_all_gather

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    param_group.foreach_all_gather = counting
    # min_new_tokens: no completion ends early, so each rollout runs the same number of forwards.
    rollout = HFRollout(max_new_tokens=6, min_new_tokens=6)
    module = RLModule(model_name_or_path=model_dir, rollout=rollout, export_dir="")
    module.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, padding_side="left")
    module.policy = load_causal_lm(model_dir)
    disable_dropout(module.policy)
    distributed.shard_with_fsdp2(module.policy, init_device_mesh("cpu", (2,)))
    units = sum(isinstance(m, distributed._fsdp2_class()) for m in module.policy.modules())
    ids, mask = module._encode_prompts(["1+2=", "13+4="] if rank == 0 else ["7+7=", "20+31="])
    result = {"units": units}
    real = distributed.gathered_once
    for mode in ("once", "per_token", "once"):
        distributed.gathered_once = real if mode == "once" else (lambda m: contextlib.nullcontext())
        calls.clear()
        torch.manual_seed(0)
        batch = module._generate(ids, mask, 2)
        result[mode] = {"gathers": len(calls), "ids": batch.completion_ids.tolist(),
                        "logp": batch.behavior_logprobs.tolist()}
        # The parameters are sharded again: a training forward/backward through FSDP still works.
        calls.clear()
        stats = module._token_stats(module.policy, batch, torch.arange(4), False)
        stats.logprobs.sum().backward()
        result[mode]["train_gathers"] = len(calls)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


GATHER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch.multiprocessing as mp
from test_distributed import _gather_count_rank
mp.spawn(_gather_count_rank, args=({model!r}, {port}, {out!r}), nprocs=2)
"""


def test_fsdp2_in_process_rollout_gathers_each_unit_once_per_rollout(tmp_path):
    import json
    import socket

    model_dir = make_tiny_model(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "gathers.json"
    script = GATHER_SCRIPT.format(tests=str(ROOT / "tests"), model=model_dir, port=port, out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    units = result["units"]
    assert units == 3  # 2 decoder layers + the model (embeddings, final norm, LM head)
    once, per_token = result["once"], result["per_token"]
    assert once["gathers"] == units  # one all-gather per FSDP unit for the whole rollout
    # Without it: every unit again at each forward (measured: 5 for 6 new tokens, the prompt's prefill shared).
    assert per_token["gathers"] >= units * 5
    assert once["ids"] == per_token["ids"] and once["logp"] == per_token["logp"]  # the same samples
    # Resharded afterwards: the training forward gathers every unit again, as before.
    assert once["train_gathers"] == per_token["train_gathers"] >= units


# ------------------------------------------------------------------------------- DDP with rollout workers

DDP_WORKER_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import lightning.pytorch as pl
import torch
from test_async_loop import module_for, worker
from drpo_lightning.data import PromptDataModule
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


class Check(pl.Callback):
    def __init__(self):
        self.sends, self.staleness = 0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        source = pl_module.feed.source
        if batch_idx == 0 and source.sender is not None:
            send = source.sender.send

            def counting(state_dict, version):
                self.sends += 1
                return send(state_dict, version)

            source.sender.send = counting

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = trainer.callback_metrics.get("rollout/staleness_max")
        self.staleness.append(None if value is None else float(value))

    def on_train_end(self, trainer, pl_module):  # before the module's own on_train_end closes the worker
        source = pl_module.feed.source
        held = source.fetch_weights()
        # The policy's full weights on every rank (FSDP2: gathered, a collective).
        own = get_model_state_dict(pl_module.policy, options=StateDictOptions(full_state_dict=True))
        result = dict(rank=trainer.global_rank, sender=source.sender is not None, sends=self.sends,
                      syncs=source.synced, staleness=self.staleness, global_step=trainer.global_step,
                      worker_equals_policy=set(held) == set(own) and all(torch.equal(held[k], own[k]) for k in own),
                      checksum=float(sum(v.double().sum() for v in own.values())))
        open({out!r} + f"/rank{{trainer.global_rank}}.json", "w").write(json.dumps(result))


pl.seed_everything(3, verbose=False)
module = module_for({model!r}, worker(1))
data = PromptDataModule(task="arithmetic", task_size=40, val_size=0, batch_size=2, val_batch_size=2, seed=0)
strategy = "ddp"
if {strategy!r} == "fsdp2":
    from lightning.pytorch.strategies import ModelParallelStrategy
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Check()])
trainer.fit(module, datamodule=data)
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_with_a_rollout_worker_each(strategy, tmp_path):
    import json

    model_dir = make_tiny_model(tmp_path / "model")
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER_SCRIPT.format(tests=str(ROOT / "tests"), model=model_dir, out=str(tmp_path),
                                               strategy=strategy))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["global_step"] == 3 and rank["syncs"] == 3
        # Step 0 fills the pipeline; then every batch is one sync old (k = 1).
        assert rank["staleness"] == [None, 0.0, 1.0, 1.0]
        # Both workers sample with the trainer's final full weights (FSDP2: one gathered state dict), bitwise.
        assert rank["worker_equals_policy"]
    # Rank 0 alone sends, once per sync: one broadcast reaches both ranks' workers.
    assert [r["sender"] for r in ranks] == [True, False] and [r["sends"] for r in ranks] == [3, 0]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the ranks hold the same (gathered) policy
