"""The rollout-engine interface: sample G completions per prompt and report how they were sampled."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from drpo_lightning.types import RolloutBatch


class RolloutEngine(ABC):
    """Base class of every rollout plugin.

    A rollout engine must report, for each sampled token, its log-probability under the distribution it
    actually sampled from (the behaviour policy mu). DRPO and DPPO anchor their trust region on these values,
    so an engine that samples in a different precision or with different kernels than the trainer exposes
    exactly the off-policy gap those objectives control.
    """

    max_new_tokens: int
    """Completion length budget; the trainer pads every completion batch to it."""

    policy_version: int = 0
    """Version of the weights the engine samples with: the number of optimizer updates applied to them."""

    # -- weight sync ------------------------------------------------------------------------------------
    # An engine that samples with its own copy of the weights (a worker process, vLLM) receives the trainer's
    # weights after updates. The in-process engine samples with the trainer's policy itself, so for it these
    # are no-ops that only track the version.

    def load_weights(self, state_dict: dict[str, torch.Tensor] | None, version: int) -> None:
        """Sample with ``state_dict`` (full, unsharded tensor names of the policy) from now on, as ``version``.

        ``None`` means the engine already shares the trainer's weights (in-process): only the version moves.
        """
        self.policy_version = int(version)

    def pause(self) -> None:
        """Stop starting new generations (called before weights are sent); in-flight ones may finish."""
        return None

    def resume(self) -> None:
        """Start generating again after :meth:`pause`."""
        return None

    @abstractmethod
    def generate(
        self,
        policy: torch.nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        num_generations: int,
        eos_token_id: int | list[int],
        pad_token_id: int,
        topk: int = 0,
    ) -> RolloutBatch:
        """Sample ``num_generations`` completions for each of the ``B`` left-padded prompts.

        Args:
            policy: the causal LM being trained (in eval mode, under no_grad, when called).
            prompt_ids: ``[B, P]`` left-padded prompt tokens.
            prompt_mask: ``[B, P]`` 1 on real tokens.
            num_generations: group size G; the result has ``N = B * G`` rows, a group's rows adjacent.
            eos_token_id: token id(s) that end a completion (kept in the completion and its mask).
            pad_token_id: id written after EOS.
            topk: also return mu's ``topk`` largest log-probs per position (0: don't).
        """
