"""Tiny, offline models and a character tokenizer for the quickstart, tests and benchmarks.

Nothing here touches the network: the tokenizer is built in memory with the ``tokenizers`` library and the
models are built from a config with random weights. The quickstart policy (a ~1M-parameter Llama warmed up
on ``a+b=`` until it knows the answers, then blurred by noisy answers so that it samples them right only about
a third of the time; see ``scripts/pretrain_quickstart.py``) ships inside the package at
:data:`QUICKSTART_POLICY`.

Conventions shared with the arithmetic task:

* prompts are ``f"{a}+{b}="`` and the target completion is ``f"{a + b}"`` followed by EOS;
* no BOS token is added (``add_bos_token`` is off): the prompts are short and every sequence starts with a
  digit, so a BOS buys nothing and would make prompt/completion bookkeeping harder; ``<bos>`` exists in the
  vocabulary and is set as ``bos_token`` so model configs have a valid id;
* :func:`is_heldout` is the single definition of the train / held-out split of ``(a, b)`` pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CHARS",
    "QUICKSTART_POLICY",
    "SPECIAL_TOKENS",
    "build_char_tokenizer",
    "build_tiny_llama",
    "build_tiny_model",
    "heldout_pairs",
    "is_heldout",
    "quickstart_policy_path",
    "shipped_policy_path",
    "train_pairs",
]

DEFAULT_CHARS = "0123456789+-*=() "
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0, 1, 2, 3

QUICKSTART_POLICY: Path = Path(__file__).resolve().parent / "assets" / "quickstart_policy"


def quickstart_policy_path() -> str:
    """Path (as a string, ready for ``from_pretrained``) of the shipped quickstart policy + tokenizer."""
    return str(QUICKSTART_POLICY)


SHIPPED_POLICIES: dict[str, Path] = {
    "quickstart": QUICKSTART_POLICY,
    # the same recipe with right answers 12% of the time in its noisy phase (instead of 30%): it samples
    # the right held-out sum 30% of the time (0.37 for the quickstart's), leaving RL more room to climb
    # (configs/study/stability_v2.yaml)
    "quickstart-weak": QUICKSTART_POLICY.parent / "quickstart_weak_policy",
}
"""Names ``model.model_name_or_path`` accepts for the policies that ship inside the package."""


def shipped_policy_path(name: str) -> str | None:
    """The folder of a shipped policy called ``name``, or None when ``name`` is not one of them."""
    path = SHIPPED_POLICIES.get(name)
    return None if path is None else str(path)


# --------------------------------------------------------------------------------------------------
# Train / held-out split for the a+b task
# --------------------------------------------------------------------------------------------------


def is_heldout(a: int, b: int) -> bool:
    """True iff the pair ``(a, b)`` belongs to the held-out split: ``(a * 7919 + b * 104729) % 20 == 0``.

    About 5% of pairs (500 of the 10,000 with ``0 <= a, b < 100``). The quickstart policy was trained only
    on pairs for which this is False, so task generators must use this function to build evaluation sets.
    """
    return (a * 7919 + b * 104729) % 20 == 0


def heldout_pairs(n: int = 100) -> list[tuple[int, int]]:
    """All held-out pairs with ``0 <= a, b < n``, in lexicographic order."""
    return [(a, b) for a in range(n) for b in range(n) if is_heldout(a, b)]


def train_pairs(n: int = 100) -> list[tuple[int, int]]:
    """All training (non-held-out) pairs with ``0 <= a, b < n``, in lexicographic order."""
    return [(a, b) for a in range(n) for b in range(n) if not is_heldout(a, b)]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def build_char_tokenizer(chars: str = DEFAULT_CHARS, *, padding_side: str = "left", model_max_length: int = 64):
    """A character-level ``PreTrainedTokenizerFast`` built offline.

    Vocabulary: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, then one token per character of
    ``chars`` in order (duplicates dropped). Every character is its own token (spaces included) and
    decoding concatenates tokens (``decoders.Fuse``), so ``decode(encode("12+34=46")) == "12+34=46"``.
    No special token is added on encode (no BOS, no EOS): append ``tokenizer.eos_token`` yourself when
    building targets. Padding is on the left, as batched generation needs.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        if ch not in vocab:
            vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every single character becomes its own "word" (whitespace kept as a token, not dropped).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def _special_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def build_tiny_llama(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 64,
    *,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    tie_word_embeddings: bool = True,
    seed: int | None = None,
    **overrides: Any,
):
    """A randomly initialised float32 ``LlamaForCausalLM`` (defaults: ~0.8M parameters).

    The special-token ids default to those of :func:`build_char_tokenizer`. ``overrides`` go to
    ``LlamaConfig`` (e.g. ``num_key_value_heads=2``, ``rope_theta=...``). ``seed`` seeds the init.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=overrides.pop("num_key_value_heads", num_heads),
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
        **overrides,
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id
    )
    return model


def build_tiny_model(
    arch: str,
    tokenizer: Any,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 64,
    seed: int | None = None,
    **overrides: Any,
):
    """A tiny randomly initialised float32 causal LM of architecture ``"llama"``, ``"qwen2"`` or ``"gpt2"``.

    Vocabulary size and special ids come from ``tokenizer``. Meant for tests of architecture-specific
    paths (GPT-2 uses absolute positions, Qwen2 has attention biases). ``overrides`` go to the config.
    """
    import torch
    from transformers import GenerationConfig

    arch = arch.lower()
    ids = _special_ids(tokenizer)
    vocab_size = len(tokenizer)
    inter = intermediate_size if intermediate_size is not None else 4 * hidden_size
    if arch == "llama":
        return build_tiny_llama(
            vocab_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=inter,
            max_position_embeddings=max_position_embeddings,
            seed=seed,
            **ids,
            **overrides,
        )
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=inter,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=overrides.pop("num_key_value_heads", num_heads),
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=overrides.pop("tie_word_embeddings", True),
            **ids,
            **overrides,
        )
        cls = Qwen2ForCausalLM
    elif arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=inter,
            n_positions=max_position_embeddings,
            **ids,
            **overrides,
        )
        cls = GPT2LMHeadModel
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of 'llama', 'qwen2', 'gpt2'")
    if seed is not None:
        torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(**ids)
    return model
