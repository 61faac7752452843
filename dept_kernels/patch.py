"""`patch(model, config)` / `unpatch(model)` / `param_groups(model, ...)` / `merge(model)`.

`patch` freezes the base weights, attaches the adapter as `model.dept_adapter` (`ADAPTER`)
and registers the hooks for the adapter's site (`dept_kernels.models.install`): the input
embedding through the fused op (prompt methods), or a bias before every layer (AoT
P-tuning). With no config it accelerates a PEFT model whose prompt encoder a method adopts
(prompt tuning; the official DePT code's PROMPT_TUNING_LORA): the same Parameter objects move
into an adapter, and the PEFT wrapper's forward and generate go straight to the hooked base
model. Nothing here names a method: they come from the registry (`methods.METHODS`,
`methods.PEFT_TYPES`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import models
from ._engines import check_embedding_unit, full_shape, is_dtensor
from .methods import METHODS, PEFT_TYPES, Adapter, adapter_class, group_names
from .methods.prompt import peft_parameter
from .models._hooks import positional_names

# The attribute holding a patched model's state. Its adapter lives under ADAPTER on the
# owner (the base model under a PEFT wrapper); the name is in every whole-model state dict
# saved from a patched model (`dept_adapter.*` keys), so it is kept for every method.
_STATE = "_dept_kernels_patch"
ADAPTER = "dept_adapter"


@dataclass
class _PatchState:
    owner: nn.Module  # the module holding the adapter (the base model under a PEFT wrapper)
    handles: list[RemovableHandle]
    requires_grad: dict[nn.Parameter, bool]
    overridden: tuple[str, ...] = field(default=())  # instance attributes set on the wrapper


def is_patched(model: nn.Module) -> bool:
    """Whether `patch` (or `load_adapter`, `stack_adapters`) has patched `model`."""
    return getattr(model, _STATE, None) is not None


def patch(
    model: nn.Module,
    config: object | None = None,
    *,
    generator=None,
    trim_padding: bool | None = None,
) -> nn.Module:
    """Attach an adapter to a Hugging Face model, in place.

    Prompt methods patch T5, the decoder-only models (GPT-2, LLaMA, Mistral, Qwen2, Gemma),
    BERT / RoBERTa / DeBERTa-v2 (their base and sequence-classification models), and through
    the generic path any other model whose forward takes inputs_embeds and attention_mask
    (OPT, BLOOM, Phi, BART, ...); AoT P-tuning every layer of the table's models (T5: every
    encoder layer).

    Args:
        model: the model; with `config=None`, a PEFT prompt-tuning model or an official DePT
            (PROMPT_TUNING_LORA) model to accelerate without changing its parameters.
        config: `DePTConfig`, `PromptTuningConfig`, `EPTConfig` or `AoTConfig`.
        generator: optional `torch.Generator` for the adapter's initialisation.
        trim_padding: cut the columns that the attention mask marks padding in every row
            before the fused op, so a batch padded to max_length costs what its longest
            input does. None (default): where the caller's outputs keep their shapes and
            values (T5, T5EncoderModel, sequence-classification heads); True: decoder-only
            LM and base models and the encoder-only base models too (their per-position
            outputs come back re-padded); False: never. Prompt methods only.

    Returns:
        `model`, whose forward and generate now take the usual arguments (ids of length s,
        a (B, s) mask, labels) and run the m prompt rows in front, or add AoT's bias.
    """
    if is_patched(model):
        raise ValueError(
            f"{type(model).__name__} is already patched with {adapter(model).config}; call "
            "dept_kernels.unpatch(model) first"
        )
    if config is None:
        return _accelerate(model, trim_padding)
    new = new_adapter(model, config, generator=generator)
    return attach_adapter(model, new, trim_padding=trim_padding)


def new_adapter(
    model: nn.Module, config: object, *, generator: torch.Generator | None = None
) -> Adapter:
    """A freshly initialised adapter of `config` for `model`, not attached to it."""
    cls = adapter_class(config)
    # The architecture first: it names what is supported, before any attribute is read.
    spec = models.describe(model, cls.site)
    # FSDP2 manages the parameters present when fully_shard ran: a new adapter's would be
    # neither sharded nor have their gradients reduced across ranks.
    _check_not_fully_sharded(model, spec.embedding.weight)
    return cls.create(config, spec, generator=generator)


def _check_not_fully_sharded(model: nn.Module, tensor: torch.Tensor) -> None:
    if is_dtensor(tensor):
        raise ValueError(
            f"{type(model).__name__}'s parameters are already sharded (DTensor): patch the "
            "model before fully_shard, so that FSDP2 manages the adapter's parameters too"
        )


def attach_adapter(
    model: nn.Module, adapter: Adapter, *, trim_padding: bool | None = None
) -> nn.Module:
    """Patch an unpatched `model` with a ready adapter (built by `new_adapter`, loaded from a
    checkpoint, or stacked): freeze the base weights and install the hooks. The model's
    `generate` then takes `task_ids` (B,) for a stacked adapter, as its forward does.
    `trim_padding` as in `patch`."""
    _check_adapter(adapter, model)
    if trim_padding and not adapter.trims_padding:
        raise ValueError(
            "trim_padding applies to the prompt methods (adapters of the input embedding); "
            f"{type(adapter).__name__} acts at {adapter.site!r}, on every column the model runs"
        )
    state = _attach(model, model, adapter, freeze=True, trim_padding=trim_padding)
    if hasattr(type(model), "generate"):
        model.__dict__["generate"] = models.Generate(model)
        state.overridden = ("generate",)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: hooks, adapter, requires_grad flags and wrapper overrides; returns model."""
    state = _state(model)
    for handle in state.handles:
        handle.remove()
    delattr(state.owner, ADAPTER)
    for param, flag in state.requires_grad.items():
        param.requires_grad_(flag)
    for name in state.overridden:
        del model.__dict__[name]
    delattr(model, _STATE)
    return model


def adapter(model: nn.Module) -> Adapter:
    """The adapter of a patched model (also under a PEFT wrapper)."""
    return getattr(_state(model).owner, ADAPTER)


def param_groups(
    model: nn.Module,
    prompt_lr: float | None = None,
    lowrank_lr: float | None = None,
    weight_decay: float = 0.01,
    **group_lrs: float,
) -> list[dict]:
    """Optimizer groups of the adapter's trainable parameters, one per named group.

    Each group's learning rate is `<name>_lr` when given, else the method's default
    (`Adapter.groups`: DePT's prompt 3e-1 and low-rank pair 1e-4, prompt tuning's 3e-1);
    a group without either raises. `prompt_lr` is the soft prompt's, `lowrank_lr` the
    low-rank pair's (DePT) or the reparameterisation's (EPT, AoT); another method's group
    `x` takes `x_lr=`. A rate for a group this adapter lacks is ignored, so one training
    script serves several methods. Pass the result to `torch.optim.AdamW(...)`, or build the
    optimizer for a `Trainer` with it (`Trainer(..., optimizers=(opt, None))`).

    Only the adapter's trainable parameters are listed; a PEFT model's extra trainable
    modules (e.g. a classifier in `modules_to_save`) need their own group.
    """
    known = group_names()
    unknown = sorted(k for k in group_lrs if not (k.endswith("_lr") and k[:-3] in known))
    if unknown:
        names = ", ".join(f"{n}_lr" for n in sorted(known))
        raise TypeError(f"param_groups got unknown arguments {unknown}; group rates are {names}")
    lrs = {k[:-3]: v for k, v in group_lrs.items()}
    lrs.update({n: v for n, v in (("prompt", prompt_lr), ("lowrank", lowrank_lr)) if v is not None})
    current = adapter(model)
    groups = []
    for name, params in current.param_groups().items():
        params = [p for p in params if p.requires_grad]
        if not params:
            continue
        lr = lrs.get(name, type(current).groups.get(name))
        if lr is None:
            raise ValueError(
                f"{type(current).__name__} has parameters that need {name}_lr (the method has "
                "no default learning rate for them)"
            )
        groups.append({"params": params, "lr": lr, "weight_decay": weight_decay})
    return groups


def merge(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Put a trained adapter in its inference form, for serving; returns `model`.

    EPT becomes the plain (n, d) prompt-tuning adapter holding p'; AoT P-tuning's per-layer
    (V, d) tables are materialised once, so each layer's bias is a gather-add
    (`ops.aot_bias_add`); prompt tuning and DePT are served as trained (no change). `dtype`
    and `device` place materialised tables (default: the adapter's); `device="cpu"` for a
    model on the GPU keeps AoT tables in host memory and moves only the rows each batch
    needs.
    """
    current = adapter(model)
    merged = current.merged(model.get_input_embeddings().weight, dtype=dtype, device=device)
    return model if merged is current else replace_adapter(model, merged)


def fuse(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Deprecated: `merge(model, dtype, device)` for AoT P-tuning. Unlike `merge`, it fuses
    the adapter object in place, as it always did."""
    warnings.warn("dept_kernels.fuse is deprecated; use dept_kernels.merge", DeprecationWarning, 2)
    current = adapter(model)
    if current.site != "layer_input":
        raise TypeError(
            f"fuse materialises AoT P-tuning tables; {type(current).__name__} has none "
            "(dept_kernels.merge puts any adapter in its inference form)"
        )
    if current.fused:
        raise ValueError("the adapter is already fused")
    merged = current.merged(model.get_input_embeddings().weight, dtype=dtype, device=device)
    for layer, fused in zip(current.layers, merged.layers, strict=True):
        layer.set_table(fused.table)
    return model


def fold(model: nn.Module) -> nn.Module:
    """Deprecated: `merge(model)` on an EPT adapter."""
    warnings.warn("dept_kernels.fold is deprecated; use dept_kernels.merge", DeprecationWarning, 2)
    current = adapter(model)
    if not hasattr(current, "prompt_row"):
        raise TypeError(
            f"{type(current).__name__} has nothing to fold (EPT adapters fold; "
            "dept_kernels.merge puts any adapter in its inference form)"
        )
    return merge(model)


def replace_adapter(model: nn.Module, new: Adapter) -> nn.Module:
    """Swap a patched model's adapter for one its hooks serve the same way."""
    owner = _state(model).owner
    _check_adapter(new, owner, current=getattr(owner, ADAPTER))
    new.train(owner.training)
    setattr(owner, ADAPTER, new)
    return model


def _check_adapter(adapter: object, model: nn.Module, current: Adapter | None = None) -> None:
    """`adapter` fits `model` (and, replacing `current`, the hooks installed for it)."""
    if not isinstance(adapter, Adapter):
        raise TypeError(
            "adapter must be a dept_kernels Adapter (from new_adapter, load_adapter or "
            f"stack_adapters), got {type(adapter).__name__}"
        )
    if current is not None and adapter.site != current.site:
        raise TypeError(
            f"the model's hooks serve a {type(current).__name__}, not a "
            f"{type(adapter).__name__}; unpatch it and attach the new adapter instead"
        )
    adapter.check_fits(models.describe(model, adapter.site))


def accelerated(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model patched without a config (its adapter lives on the base
    model, and its own forward and generate are replaced)."""
    return _state(model).owner is not model


def _state(model: nn.Module) -> _PatchState:
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched; call dept_kernels.patch first")
    return state


def _attach(
    model: nn.Module,
    owner: nn.Module,
    adapter: Adapter,
    *,
    freeze: bool,
    trim_padding: bool | None = None,
) -> _PatchState:
    if hasattr(owner, ADAPTER):
        raise ValueError(f"{type(owner).__name__} already has an attribute {ADAPTER!r}")
    requires_grad = {}
    if freeze:
        others = _other_adapters(owner)
        requires_grad = {p: p.requires_grad for p in owner.parameters() if p not in others}
        for p in requires_grad:
            p.requires_grad_(False)
    # A module starts in training mode; the adapter follows the model (AoT has dropout).
    adapter.train(owner.training)
    setattr(owner, ADAPTER, adapter)
    try:
        adapter_of = models.AdapterOf(owner, ADAPTER, trim_padding)
        handles = models.install(owner, adapter_of, adapter.site)
        # First of all hooks: the layout check runs before any hook reads the embedding.
        handles.append(owner.register_forward_pre_hook(_LayoutCheck(), prepend=True))
    except Exception:
        delattr(owner, ADAPTER)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        raise
    state = _PatchState(owner, handles, requires_grad)
    setattr(model, _STATE, state)
    return state


class _LayoutCheck:
    """A pre-hook on the patched model refusing an engine layout in which it cannot run
    (`check_embedding_unit`: FSDP1 with a tied embedding in a unit of its own). An object,
    so that copies and pickles of the model keep it."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling() or not torch.distributed.is_initialized():
            return
        check_embedding_unit(module)


def _other_adapters(model: nn.Module) -> set[nn.Parameter]:
    """Parameters of other PEFT adapters injected into `model` (LoRA's factors, ...): the
    patch freezes the base weights, never another adapter's (DePT on a LoRA model trains both)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    others = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                held = getattr(module, name, None)
                if isinstance(held, nn.Module):
                    others.update(held.parameters())
    return others


# --------------------------------------------------------------------------- PEFT models


def _peft_type(config: object) -> str:
    peft_type = getattr(config, "peft_type", None)
    return str(getattr(peft_type, "value", peft_type))


def _accelerate(model: nn.Module, trim_padding: bool | None = None) -> nn.Module:
    """Route a PEFT model's forward through the adapter adopting its prompt encoder."""
    peft_configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", "default")
    if not isinstance(peft_configs, dict) or active not in peft_configs:
        raise TypeError(
            f"patch({type(model).__name__}) needs a config (one of "
            f"{', '.join(sorted(c.__name__ for c in METHODS))}); only PEFT models of types "
            f"{sorted(PEFT_TYPES)} patch without one"
        )
    peft_config = peft_configs[active]
    peft_type = _peft_type(peft_config)
    if peft_type not in PEFT_TYPES:
        raise TypeError(
            f"patch() without a config accelerates {' and '.join(sorted(PEFT_TYPES))} models, "
            f"got peft_type {peft_type!r}"
        )
    encoder = model.prompt_encoder[active]
    base = model.base_model
    m = peft_config.num_virtual_tokens
    prompt = peft_parameter(encoder, "embedding")
    # FSDP2 swaps in gathered tensors on the modules it wrapped, not on the adapter that
    # would hold the same Parameters: the adapter would read the shards.
    _check_not_fully_sharded(model, prompt)
    # PEFT's default for seq2seq models is 2 submodules: the encoder holds 2m rows, of which
    # its prompt tuning feeds the first m to the encoder and none to the decoder.
    submodules = getattr(peft_config, "num_transformer_submodules", None) or 1
    seq2seq = getattr(base.config, "is_encoder_decoder", False)
    if submodules not in (1, 2) or (submodules == 2 and not seq2seq):
        raise ValueError(
            f"num_transformer_submodules={submodules} is supported for 1, and for 2 on "
            f"encoder-decoder models; {type(base).__name__} is "
            f"{'an encoder-decoder' if seq2seq else 'a decoder-only'} model"
        )
    # Shapes from the engine where it partitions the parameters (DeepSpeed ZeRO-3).
    rows = full_shape(prompt)[0]
    if rows != m * submodules:
        raise ValueError(
            f"the prompt encoder holds {rows} virtual tokens for num_virtual_tokens="
            f"{m} and num_transformer_submodules={submodules}; expected {m * submodules}"
        )
    weight = base.get_input_embeddings().weight
    new = PEFT_TYPES[peft_type].adopt(peft_config, encoder, weight)
    state = _attach(model, base, new, freeze=False, trim_padding=trim_padding)
    # Objects, not bound methods or closures: a deep copy or a pickle of the model keeps them,
    # bound to the copy.
    model.__dict__["forward"] = _PeftForward(model)
    model.__dict__["generate"] = models.Generate(base)
    state.overridden = ("forward", "generate")
    return model


class _PeftForward:
    """The accelerated PEFT model's forward: straight to the hooked base model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, task_ids=None, **kwargs):
        if task_ids is not None:
            raise ValueError("task_ids are not supported by the accelerated prompt-tuning forward")
        kwargs.update(zip(positional_names(type(self.model)), args, strict=False))
        return self.model.base_model(**kwargs)
