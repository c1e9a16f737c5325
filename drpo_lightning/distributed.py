"""Sharding helpers: an FSDP wrap policy that finds the decoder layers from the model, and the glue that lets
an RL step (generation, several forward/backward passes) run on a sharded policy.

Wrap policy
-----------
:class:`DecoderLayerPolicy` is given to Lightning's ``FSDPStrategy`` as ``auto_wrap_policy`` (and, with
``include_model: false``, as ``activation_checkpointing_policy``). It is resolved when FSDP runs it on the
module being wrapped: the decoder-layer classes are read from the ``_no_split_modules`` attribute of every
Hugging Face ``PreTrainedModel`` found inside (``["LlamaDecoderLayer"]``, ``["Qwen2DecoderLayer"]``,
``["GPT2Block"]``, ...), so one YAML file serves every architecture and nothing is hard-coded::

    strategy:
      class_path: lightning.pytorch.strategies.FSDPStrategy
      init_args:
        auto_wrap_policy: {class_path: drpo_lightning.distributed.DecoderLayerPolicy}
        activation_checkpointing_policy:
          class_path: drpo_lightning.distributed.DecoderLayerPolicy
          init_args: {include_model: false}

It subclasses torch's ``ModuleWrapPolicy`` (the type Lightning's ``FSDPStrategy`` accepts) and works both as a
``_Policy`` (``_run_policy``, used by FSDP and ``apply_activation_checkpointing``) and as a legacy callable.

Why the model itself is wrapped too (``include_model: true``, the default for FSDP): Lightning wraps the whole
LightningModule in the root FSDP unit and runs ``training_step`` inside that unit's forward. Parameters left
in the root unit (embeddings, final norm, LM head) are resharded by the first backward pass of the step, but an
RL step runs several forward/backward passes (minibatches, PPO epochs, micro-batches) within one
``training_step``. Giving the ``PreTrainedModel`` its own unit means every pass gathers those parameters
again through :func:`call_through`.

Running code "through" a sharded module
---------------------------------------
FSDP gathers a unit's parameters only when that unit's ``forward`` is called. An RL step uses the policy in
other ways: ``generate`` (which calls the inner model, not the FSDP wrapper) and the memory-lean log-prob path
(which runs the decoder body and uses the LM head weight directly). :func:`call_through` runs any function as
if it were the module's forward, so FSDP1's wrapper and FSDP2's hooks gather the parameters around it and
register their backward hooks as usual.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

__all__ = [
    "DecoderLayerPolicy",
    "call_through",
    "decoder_layer_classes",
    "decoder_layer_names",
    "fsdp_root",
    "full_state_dict",
    "gathered_once",
    "is_sharded",
    "save_pretrained_full",
    "shard_with_fsdp2",
    "unwrap",
]


def _pretrained_models(root: nn.Module, outermost: bool = False) -> list[nn.Module]:
    """Hugging Face models inside ``root``; with ``outermost`` not those inside another one (the
    ``LlamaModel`` body of a ``LlamaForCausalLM`` is itself a ``PreTrainedModel``)."""
    from transformers import PreTrainedModel

    models = [m for m in root.modules() if isinstance(m, PreTrainedModel)]
    if not outermost:
        return models
    inner = {id(sub) for m in models for sub in m.modules() if sub is not m}
    return [m for m in models if id(m) not in inner]


def decoder_layer_names(root: nn.Module) -> set[str]:
    """Class names listed in ``_no_split_modules`` by the Hugging Face models inside ``root``."""
    names: set[str] = set()
    for model in _pretrained_models(root):
        names.update(getattr(model, "_no_split_modules", None) or ())
    return names


def decoder_layer_classes(root: nn.Module, names: Iterable[str] | None = None) -> set[type[nn.Module]]:
    """The module classes inside ``root`` whose name is a decoder-layer name (see :func:`decoder_layer_names`).

    Raises:
        ValueError: ``root`` holds no Hugging Face model declaring ``_no_split_modules`` (give the class names
            explicitly), or none of the declared classes occurs in it.
    """
    wanted = set(names) if names is not None else decoder_layer_names(root)
    if not wanted:
        raise ValueError(
            "DecoderLayerPolicy: no Hugging Face model with `_no_split_modules` was found in the module being "
            "wrapped; set `layer_class_names` (e.g. [LlamaDecoderLayer]) explicitly"
        )
    found = {type(m) for m in root.modules() if type(m).__name__ in wanted}
    if not found:
        raise ValueError(f"DecoderLayerPolicy: none of the layer classes {sorted(wanted)} occurs in the model")
    return found


class DecoderLayerPolicy(ModuleWrapPolicy):
    """FSDP auto-wrap / activation-checkpointing policy: every decoder layer of the Hugging Face models inside
    the wrapped module, found from their ``_no_split_modules``.

    Args:
        include_model: also select each ``PreTrainedModel`` itself (its embeddings, final norm and LM head then
            form one unit). Use true for ``auto_wrap_policy`` and false for ``activation_checkpointing_policy``.
        layer_class_names: class names to select instead of the models' ``_no_split_modules``.
    """

    def __init__(self, include_model: bool = True, layer_class_names: list[str] | None = None) -> None:
        super().__init__(())
        self.include_model = include_model
        self.layer_class_names = list(layer_class_names) if layer_class_names else None

    def selected(self, root: nn.Module) -> list[nn.Module]:
        """The modules of ``root`` this policy applies to, in ``root.modules()`` order."""
        classes = tuple(decoder_layer_classes(root, self.layer_class_names))
        models = {id(m) for m in _pretrained_models(root, outermost=True)} if self.include_model else set()
        return [m for m in root.modules() if isinstance(m, classes) or id(m) in models]

    def _run_policy(self, root_module, ignored_modules, root_kwargs):
        return {m: dict(root_kwargs) for m in self.selected(root_module) if m not in ignored_modules}

    def __call__(self, module: nn.Module, recurse: bool, *args: Any, **kwargs: Any) -> bool:
        # Legacy callable form (FSDP's recursive wrap): resolve the classes on the first (root) call.
        if recurse:
            if not self._module_classes:
                self._module_classes = decoder_layer_classes(module, self.layer_class_names)
                self._model_ids = (
                    {id(m) for m in _pretrained_models(module, outermost=True)} if self.include_model else set()
                )
            return True
        return isinstance(module, tuple(self._module_classes)) or id(module) in getattr(self, "_model_ids", ())

    def __repr__(self) -> str:
        return f"DecoderLayerPolicy(include_model={self.include_model}, layer_class_names={self.layer_class_names})"


# ------------------------------------------------------------------------------------------ sharded modules


def _fsdp1_class():
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def _fsdp2_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    return FSDPModule


def is_sharded(module: nn.Module | None) -> bool:
    """Whether ``module`` is (or contains) an FSDP1 unit or an FSDP2 ``fully_shard``-ed module."""
    if module is None:
        return False
    kinds = (_fsdp1_class(), _fsdp2_class())
    return any(isinstance(m, kinds) for m in module.modules())


def unwrap(module: nn.Module) -> nn.Module:
    """The Hugging Face model inside an FSDP1 wrapper (FSDP2 modules are the model itself)."""
    fsdp1 = _fsdp1_class()
    while isinstance(module, fsdp1):
        module = module.module
    return module


def fsdp_root(module: nn.Module) -> nn.Module | None:
    """The outermost FSDP1 unit or FSDP2 module at or inside ``module`` (None when nothing is sharded)."""
    kinds = (_fsdp1_class(), _fsdp2_class())
    return next((m for m in module.modules() if isinstance(m, kinds)), None)


def call_through(module: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` as the forward of ``module``.

    For a plain module this is just ``fn(...)``. For an FSDP1 wrapper or an FSDP2 module the call goes through
    ``module.__call__``: FSDP gathers the unit's parameters before ``fn`` runs, reshards them after, and (with
    gradients enabled) registers the hooks that reduce their gradients in backward. ``fn`` should use
    :func:`unwrap` (module) for the model; calls it makes to the model's own forward (``generate`` does) see the
    real forward: the patch is removed before ``fn`` runs.
    """
    fsdp1, fsdp2 = _fsdp1_class(), _fsdp2_class()
    if isinstance(module, fsdp1):
        target = module.module
    elif isinstance(module, fsdp2):
        target = module
    else:
        return fn(*args, **kwargs)
    had_attr = "forward" in target.__dict__
    original = target.__dict__.get("forward")

    def restore() -> None:
        if had_attr:
            target.forward = original
        else:
            target.__dict__.pop("forward", None)

    def redirected(*_a: Any, **_k: Any) -> Any:
        restore()
        return fn(*args, **kwargs)

    target.forward = redirected
    try:
        with warnings.catch_warnings():
            # FSDP2 warns that outputs which are views could lose its pre-backward hook through in-place ops;
            # the RL step never modifies them in place.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            return module()
    finally:
        restore()


@contextmanager
def gathered_once(module: nn.Module) -> Iterator[None]:
    """Keep the full parameters of every FSDP2 unit in ``module`` gathered from their first use to the end of
    the block, then reshard them.

    Generation runs one forward per new token; FSDP2 all-gathers a unit before each of its forwards and frees
    the full parameters after it (``reshard_after_forward``), so every decoder layer would be gathered once
    per token. Inside this block each unit is gathered once per rollout. A plain module (and FSDP1, whose
    units cannot be kept gathered while their forward runs) passes through unchanged.
    """
    units = [m for m in module.modules() if isinstance(m, _fsdp2_class())]
    saved = []
    try:
        if units:
            root_state = units[0]._get_fsdp_state()
            # The root's lazy init decides which units reshard after forward: let it run before overriding.
            getattr(root_state, "_lazy_init", lambda: None)()
        for unit in units:
            state = unit._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # torch < 2.8: one group per unit
                groups = [getattr(state, "_fsdp_param_group", None)]
            for group in groups:
                if group is not None and hasattr(group, "post_forward_mesh_info"):
                    saved.append((group, group.post_forward_mesh_info))
                    group.post_forward_mesh_info = None  # what reshard_after_forward=False sets
    except AttributeError:  # FSDP2 internals moved: stay correct (gathered per forward), only slower
        units = []
    try:
        yield
    finally:
        for group, info in saved:
            group.post_forward_mesh_info = info
        for unit in units:
            unit.reshard()


def shard_with_fsdp2(model: nn.Module, mesh: Any, **fully_shard_kwargs: Any) -> nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer (from ``_no_split_modules``), then the model itself."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    classes = tuple(decoder_layer_classes(model))
    for layer in [m for m in model.modules() if isinstance(m, classes)]:
        fully_shard(layer, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def full_state_dict(root: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU state dict of ``root`` on every rank, keys under ``prefix`` only, prefix removed.

    A collective: every rank must call it. Works for FSDP1 and FSDP2 (``torch.distributed.checkpoint``'s
    ``get_model_state_dict`` with ``full_state_dict=True, cpu_offload=True``) and for plain modules.
    """
    if is_sharded(root):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in root.state_dict().items()}
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}



def _original_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class: FSDP2 swaps it for a dynamic ``FSDP<Name>`` subclass."""
    fsdp2 = _fsdp2_class()
    return next(c for c in type(model).__mro__ if not issubclass(c, fsdp2))


def save_pretrained_full(model: nn.Module, target: str, state_dict: dict[str, torch.Tensor]) -> None:
    """``save_pretrained(target, state_dict=...)`` of a sharded Hugging Face model with a gathered full state
    dict (see :func:`full_state_dict`); the folder loads with ``from_pretrained`` like an unsharded export."""
    import json
    from pathlib import Path

    inner = unwrap(model)
    inner.save_pretrained(target, state_dict=state_dict)
    name = _original_class(inner).__name__
    config_file = Path(target) / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("architectures") != [name]:
        config["architectures"] = [name]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
