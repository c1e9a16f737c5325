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
