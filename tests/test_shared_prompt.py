"""The shared-prompt forward of ``policy_token_stats``: each distinct prompt runs once, results unchanged."""

from __future__ import annotations

import pytest
import torch

from drpo_lightning import logprobs
from drpo_lightning.logprobs import policy_token_stats
from drpo_lightning.tiny import build_char_tokenizer, build_tiny_model


def _batch(groups: int, group_size: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0):
    """Left-padded prompts (each repeated ``group_size`` times, rows of a group adjacent) + completions."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(4, vocab, (groups, prompt_len), generator=g)
    prompt_mask = torch.ones(groups, prompt_len, dtype=torch.long)
    for i in range(groups):  # prompt i has i padding positions on the left (at most prompt_len - 2)
        pad = min(i, prompt_len - 2)
        prompts[i, :pad] = 0
        prompt_mask[i, :pad] = 0
    prompts = prompts.repeat_interleave(group_size, 0)
    prompt_mask = prompt_mask.repeat_interleave(group_size, 0)
    completions = torch.randint(4, vocab, (groups * group_size, completion_len), generator=g)
    completion_mask = torch.ones_like(completions)
    completion_mask[0, completion_len // 2 :] = 0  # a short completion: padding after its end
    completions[0, completion_len // 2 :] = 0
    ids = torch.cat([prompts, completions], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    return ids, mask, prompt_len


def _grads(model, stats):
    loss = (stats.logprobs * torch.linspace(-1, 1, stats.logprobs.numel()).view_as(stats.logprobs)).sum()
    loss = loss + stats.entropy.mean()
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_shared_prompt_matches_the_full_forward(arch):
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(arch, tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0).eval()  # GPT-2 dropout
    ids, mask, prompt_len = _batch(groups=3, group_size=4, prompt_len=6, completion_len=7, vocab=len(tokenizer))
    rows = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(1))  # groups need not be adjacent
    ids, mask = ids[rows], mask[rows]
    full = policy_token_stats(model, ids, mask, prompt_len, share_prompt=False)
    shared = policy_token_stats(model, ids, mask, prompt_len, share_prompt=True)
    completion_mask = mask[:, prompt_len:].bool()
    torch.testing.assert_close(shared.logprobs[completion_mask], full.logprobs[completion_mask], atol=2e-5, rtol=0)
    torch.testing.assert_close(shared.entropy[completion_mask], full.entropy[completion_mask], atol=2e-5, rtol=0)
    for g_full, g_shared in zip(_grads(model, full), _grads(model, shared)):
        torch.testing.assert_close(g_shared, g_full, atol=1e-5, rtol=1e-4)


def test_shared_prompt_runs_the_prefix_once_per_distinct_prompt(monkeypatch):
    tokenizer = build_char_tokenizer()
    model = build_tiny_model("llama", tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    ids, mask, prompt_len = _batch(groups=2, group_size=4, prompt_len=5, completion_len=3, vocab=len(tokenizer))
    batch_sizes = []
    body = model.get_decoder()
    hook = body.register_forward_pre_hook(lambda m, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape),
                                          with_kwargs=True)
    try:
        policy_token_stats(model, ids, mask, prompt_len)
    finally:
        hook.remove()
    assert batch_sizes == [torch.Size([2, prompt_len - 1]), torch.Size([8, 3])]


@pytest.mark.parametrize("case", ["unique_prompts", "gradient_checkpointing", "single_token_prompt"])
def test_shared_prompt_falls_back_to_the_full_forward(case, monkeypatch):
    tokenizer = build_char_tokenizer()
    model = build_tiny_model("llama", tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0).train()
    if case == "unique_prompts":
        ids, mask, prompt_len = _batch(groups=6, group_size=1, prompt_len=6, completion_len=4, vocab=len(tokenizer))
    elif case == "single_token_prompt":
        ids, mask, prompt_len = _batch(groups=2, group_size=3, prompt_len=1, completion_len=4, vocab=len(tokenizer))
        mask[:, 0] = 1
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as models.py
        ids, mask, prompt_len = _batch(groups=2, group_size=3, prompt_len=6, completion_len=4, vocab=len(tokenizer))
    calls = []
    original = logprobs._shared_prompt_hidden
    monkeypatch.setattr(logprobs, "_shared_prompt_hidden",
                        lambda *a, **k: calls.append(out := original(*a, **k)) or out)
    full = policy_token_stats(model, ids, mask, prompt_len, share_prompt=False)
    auto = policy_token_stats(model, ids, mask, prompt_len)
    assert calls == [None]  # asked, declined: the plain forward ran
    torch.testing.assert_close(auto.logprobs, full.logprobs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_rollout_prefills_each_prompt_once_and_samples_the_same_tokens(arch):
    from drpo_lightning.rollouts.hf import HFRollout

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(arch, tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    enc = tokenizer(["12+34=", "5+6=", "7+80="], padding=True, return_tensors="pt")  # left-padded
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    results = {}
    try:
        for share in (False, True):
            rollout = HFRollout(max_new_tokens=5, temperature=0.9, share_prompt=share)
            torch.manual_seed(0)
            shapes.clear()
            results[share] = rollout.generate(model, enc["input_ids"], enc["attention_mask"], num_generations=4,
                                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                              topk=2)
            results[share, "first call"] = shapes[0]
    finally:
        hook.remove()
    assert results[False, "first call"] == torch.Size([12, 6])  # every sample prefills its prompt
    assert results[True, "first call"] == torch.Size([3, 5])  # each prompt once, all but its last token
    plain, shared = results[False], results[True]
    assert torch.equal(plain.completion_ids, shared.completion_ids)
    assert torch.equal(plain.completion_mask, shared.completion_mask)
    torch.testing.assert_close(shared.behavior_logprobs, plain.behavior_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.topk_logprobs, plain.topk_logprobs, atol=1e-5, rtol=0)
