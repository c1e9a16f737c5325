"""A reward model: a local sequence-classification model that scores prompt + completion."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from drpo_lightning.rewards.base import RewardFunction


class RewardModel(RewardFunction):
    """Scores each ``prompt + completion`` with a local ``AutoModelForSequenceClassification``.

    The model and tokenizer are loaded from the folder ``model_name_or_path`` (never downloaded) on the
    first call, then kept. The text scored is ``template.format(prompt=..., completion=...)``, by default
    the plain concatenation. Texts longer than ``max_length`` tokens are cut from the *left*, so the
    completion (which the score is about) is kept. The score is the model's logit: the only one when
    ``num_labels == 1``, else the one at ``label_index``.

    Args:
        model_name_or_path: folder holding the model and its tokenizer (``save_pretrained`` output).
        batch_size: completions per forward pass.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when available.
        max_length: most tokens per scored text.
        dtype: weights dtype, e.g. ``"bfloat16"``; None keeps float32.
        template: how prompt and completion are joined.
        label_index: which logit is the score for models with ``num_labels > 1``.
    """

    def __init__(
        self,
        model_name_or_path: str,
        batch_size: int = 16,
        device: str | None = None,
        max_length: int = 512,
        dtype: str | None = None,
        template: str = "{prompt}{completion}",
        label_index: int | None = None,
    ) -> None:
        path = os.fspath(model_name_or_path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"reward model folder model_name_or_path={path!r} does not exist "
                "(give a local folder written by save_pretrained; nothing is downloaded)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'bfloat16', got {dtype!r}")
        try:
            template.format(prompt="", completion="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"template {template!r} must use only {{prompt}} and {{completion}}: {err}"
            ) from None
        self.model_name_or_path = path
        self.batch_size = int(batch_size)
        self.device = device
        self.max_length = int(max_length)
        self.dtype = dtype
        self.template = template
        self.label_index = label_index
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            path = self.model_name_or_path
            if not os.path.isdir(path):
                raise FileNotFoundError(f"reward model folder model_name_or_path={path!r} does not exist")
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                kwargs: dict[str, Any] = {"local_files_only": True}
                if self.dtype is not None:
                    kwargs["dtype"] = getattr(torch, self.dtype)
                model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
            except (OSError, ValueError) as err:
                msg = " ".join(str(err).split())
                raise OSError(
                    f"could not load a sequence-classification model and tokenizer from "
                    f"model_name_or_path={path!r}: {msg}"
                ) from None
            num_labels = model.config.num_labels
            if self.label_index is None and num_labels != 1:
                raise ValueError(
                    f"reward model {path!r} has num_labels={num_labels}; set label_index to pick the score"
                )
            if self.label_index is not None and not 0 <= self.label_index < num_labels:
                raise ValueError(
                    f"label_index={self.label_index} is out of range for num_labels={num_labels}"
                )
            if tokenizer.pad_token is None:
                if tokenizer.eos_token is None:
                    raise ValueError(f"the tokenizer in {path!r} has neither a pad token nor an EOS token")
                tokenizer.pad_token = tokenizer.eos_token
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
            tokenizer.truncation_side = "left"
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            model.to(device).eval()
            self._tokenizer, self._model = tokenizer, model

    @torch.no_grad()
    def __call__(
        self, *, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        self._load()
        texts = [self.template.format(prompt=p, completion=c) for p, c in zip(prompts, completions)]
        device = next(self._model.parameters()).device
        index = 0 if self.label_index is None else self.label_index
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batch.pop("token_type_ids", None)
            logits = self._model(**batch.to(device)).logits
            scores.extend(logits[:, index].float().cpu().tolist())
        return scores

    def __repr__(self) -> str:
        return f"RewardModel(model_name_or_path={self.model_name_or_path!r}, batch_size={self.batch_size})"
