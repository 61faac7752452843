"""`patch(model, config)` / `unpatch(model)` / `param_groups(model, ...)` / `fuse(model)`.

`patch` freezes the base weights, attaches the adapter as `model.dept_adapter` and
registers the architecture's hooks (`dept_kernels.models`), which route the input embedding
through the fused op (prompt methods) or add AoT P-tuning's bias before every layer. With no
config it accelerates a PEFT prompt-tuning model or a model of the official DePT code (its
PEFT fork): the same Parameter objects move into an adapter, and the PEFT wrapper's forward
and generate go straight to the hooked base model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import models
from ._engines import check_embedding_unit, embedding_shape, full_shape, is_dtensor, is_sharded
from .methods import (
    METHODS,
    AoTAdapter,
    AoTConfig,
    DePTConfig,
    PromptAdapter,
    PromptTuningConfig,
)
from .models._hooks import positional_names

_STATE = "_dept_kernels_patch"
ADAPTER = "dept_adapter"


@dataclass
class _PatchState:
    owner: nn.Module  # the module holding `dept_adapter` (the base model under a PEFT wrapper)
    handles: list[RemovableHandle]
    requires_grad: dict[nn.Parameter, bool]
    overridden: tuple[str, ...] = field(default=())  # instance attributes set on the wrapper


def patch(
    model: nn.Module,
    config: object | None = None,
    *,
    generator=None,
    trim_padding: bool | None = None,
) -> nn.Module:
    """Attach an adapter to a Hugging Face model, in place.

    Prompt methods patch T5 / GPT-2 / LLaMA; AoT P-tuning also BERT and RoBERTa (every
    layer; T5: every encoder layer).

    Args:
        model: the model; with `config=None`, a PEFT prompt-tuning model or an official DePT
            (PROMPT_TUNING_LORA) model to accelerate without changing its parameters.
        config: `DePTConfig`, `PromptTuningConfig`, `EPTConfig` or `AoTConfig`.
        generator: optional `torch.Generator` for the adapter's initialisation.
        trim_padding: cut the columns that the attention mask marks padding in every row
            before the fused op, so a batch padded to max_length costs what its longest
            input does. None (default): where the caller's outputs keep their shapes and
            values (T5, T5EncoderModel, sequence-classification heads); True: decoder-only
            LM and base models too (their per-position outputs come back re-padded);
            False: never. Prompt methods only.

    Returns:
        `model`, whose forward and generate now take the usual arguments (ids of length s,
        a (B, s) mask, labels) and run the m prompt rows in front, or add AoT's bias.
    """
    if getattr(model, _STATE, None) is not None:
        raise ValueError(
            f"{type(model).__name__} is already patched with "
            f"{_state(model).owner.dept_adapter.config}; call dept_kernels.unpatch(model) first"
        )
    if config is None:
        return _accelerate(model, trim_padding)
    adapter = new_adapter(model, config, generator=generator)
    return attach_adapter(model, adapter, trim_padding=trim_padding)


def new_adapter(
    model: nn.Module, config: object, *, generator: torch.Generator | None = None
) -> nn.Module:
    """A freshly initialised adapter of `config` for `model`, not attached to it."""
    if type(config) not in METHODS:
        names = ", ".join(c.__name__ for c in METHODS)
        raise TypeError(f"config must be one of {names}, got {type(config).__name__}")
    aot = isinstance(config, AoTConfig)
    # The architecture first: it names what is supported, before any attribute is read.
    layers = models.aot_sites(model)[1] if aot else models.architecture(model)
    weight = model.get_input_embeddings().weight
    # FSDP2 manages the parameters present when fully_shard ran: a new adapter's would be
    # neither sharded nor have their gradients reduced across ranks.
    _check_not_fully_sharded(model, weight)
    if aot:
        d = model.config.hidden_size
        return AoTAdapter.create(config, weight, len(layers), d, generator=generator)
    return METHODS[type(config)](config, weight, generator=generator)


def _check_not_fully_sharded(model: nn.Module, tensor: torch.Tensor) -> None:
    if is_dtensor(tensor):
        raise ValueError(
            f"{type(model).__name__}'s parameters are already sharded (DTensor): patch the "
            "model before fully_shard, so that FSDP2 manages the adapter's parameters too"
        )


def attach_adapter(
    model: nn.Module, adapter: nn.Module, *, trim_padding: bool | None = None
) -> nn.Module:
    """Patch an unpatched `model` with a ready adapter (built by `new_adapter`, loaded from a
    checkpoint, or stacked): freeze the base weights and install the hooks. The model's
    `generate` then takes `task_ids` (B,) for a stacked adapter, as its forward does.
    `trim_padding` as in `patch`."""
    _check_adapter(adapter, model)
    if isinstance(adapter, AoTAdapter):
        if trim_padding:
            raise ValueError(
                "trim_padding applies to the prompt methods; AoT P-tuning adds its bias to "
                "every column the model runs"
            )
        install = models.install_aot
    else:
        install = models.architecture(model).install
    state = _attach(model, model, install, adapter, freeze=True, trim_padding=trim_padding)
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


def adapter(model: nn.Module) -> nn.Module:
    """The adapter of a patched model (also under a PEFT wrapper)."""
    return getattr(_state(model).owner, ADAPTER)


def param_groups(
    model: nn.Module,
    prompt_lr: float | None = None,
    lowrank_lr: float | None = None,
    weight_decay: float = 0.01,
) -> list[dict]:
    """Optimizer groups: the soft prompt at `prompt_lr`, the low-rank pair (DePT) or the
    reparameterisation (EPT, AoT) at `lowrank_lr`. Pass to `torch.optim.AdamW(...)` or build
    the optimizer for a `Trainer` with it (`Trainer(..., optimizers=(opt, None))`). AoT has
    no soft prompt, so it needs `lowrank_lr` only.

    Only the adapter's trainable parameters are listed; a PEFT model's extra trainable
    modules (e.g. a classifier in `modules_to_save`) need their own group.
    """
    current = adapter(model)
    groups = []
    for params, lr, name in zip(
        current.param_groups(), (prompt_lr, lowrank_lr), ("prompt_lr", "lowrank_lr"), strict=True
    ):
        params = [p for p in params if p.requires_grad]
        if not params:
            continue
        if lr is None:
            raise ValueError(f"{type(current).__name__} has parameters that need {name}")
        groups.append({"params": params, "lr": lr, "weight_decay": weight_decay})
    return groups


def fuse(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Materialise a trained AoT adapter's per-layer (V, d) tables once, for inference.

    Afterwards each layer's bias is a gather-add (`ops.aot_bias_add`). `dtype` and `device`
    default to the adapter's; `device="cpu"` for a model on the GPU keeps the tables in host
    memory and moves only the rows each batch needs. Returns `model`.
    """
    current = adapter(model)
    if not isinstance(current, AoTAdapter):
        raise TypeError(
            f"fuse materialises AoT P-tuning tables; {type(current).__name__} has none "
            "(EPT adapters fold: dept_kernels.fold)"
        )
    if is_sharded([*current.parameters(), model.get_input_embeddings().weight]):
        # Fusing replaces the adapter's parameters by buffers, which an engine managing
        # them (its optimizer, its shards) would not follow.
        raise ValueError(
            "fuse needs the whole adapter and embedding, but an engine (FSDP, DeepSpeed "
            "ZeRO-3) shards them: save the adapter (dept_kernels.save_adapter, on every rank), "
            "load it onto an unwrapped model and fuse there"
        )
    current.fuse(model.get_input_embeddings().weight, dtype=dtype, device=device)
    return model


def fold(model: nn.Module) -> nn.Module:
    """Replace a trained EPT adapter by the equivalent plain (n, d) prompt-tuning adapter."""
    current = adapter(model)
    if not hasattr(current, "fold"):
        raise TypeError(f"{type(current).__name__} has nothing to fold (EPT adapters fold)")
    return replace_adapter(model, current.fold())


def replace_adapter(model: nn.Module, new: nn.Module) -> nn.Module:
    """Swap a patched model's adapter for one its hooks serve the same way."""
    owner = _state(model).owner
    _check_adapter(new, owner, current=getattr(owner, ADAPTER))
    new.train(owner.training)
    setattr(owner, ADAPTER, new)
    return model


def _check_adapter(adapter: object, model: nn.Module, current: nn.Module | None = None) -> None:
    """`adapter` fits `model` (and, replacing `current`, the hooks installed for it)."""
    if not isinstance(adapter, (PromptAdapter, AoTAdapter)):
        raise TypeError(
            "adapter must be a PromptAdapter or an AoTAdapter (from new_adapter, load_adapter "
            f"or stack_adapters), got {type(adapter).__name__}"
        )
    if current is not None and isinstance(adapter, AoTAdapter) != isinstance(current, AoTAdapter):
        raise TypeError(
            f"the model's hooks serve a {type(current).__name__}, not a "
            f"{type(adapter).__name__}; unpatch it and attach the new adapter instead"
        )
    if isinstance(adapter, AoTAdapter):
        layers = len(models.aot_sites(model)[1])
        got = (len(adapter.layers), adapter.layers[0].d)
        if got != (layers, model.config.hidden_size):
            raise ValueError(
                f"the AoTAdapter has {got[0]} layers of width {got[1]}; the model has {layers} "
                f"layers of width {model.config.hidden_size}"
            )
        return
    d = embedding_shape(model.get_input_embeddings().weight)[1]
    width = full_shape(adapter.prompt)[-1]  # an engine's shard has its own shape
    if width != d:
        raise ValueError(
            f"the {type(adapter).__name__}'s prompt has width {width}; the model's embeddings "
            f"have d={d}"
        )


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
    install: Callable[[nn.Module, models.AdapterOf], list[RemovableHandle]],
    adapter: nn.Module,
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
        handles = install(owner, models.AdapterOf(owner, ADAPTER, trim_padding))
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


def _tensor(obj: object, name: str) -> nn.Parameter:
    """A prompt-encoder attribute as its Parameter (nn.Embedding / nn.Linear give .weight)."""
    value = getattr(obj, name, None)
    value = getattr(value, "weight", value)
    if not isinstance(value, nn.Parameter):
        raise TypeError(
            f"prompt encoder attribute {name!r} is not a Parameter or a module with one"
        )
    return value


def _accelerate(model: nn.Module, trim_padding: bool | None = None) -> nn.Module:
    """Route a PEFT prompt-tuning (or official DePT) model's forward through the fused op."""
    peft_configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", "default")
    if not isinstance(peft_configs, dict) or active not in peft_configs:
        raise TypeError(
            f"patch({type(model).__name__}) needs a config (DePTConfig, PromptTuningConfig, "
            "EPTConfig); only PEFT prompt-tuning and official DePT models patch without one"
        )
    peft_config = peft_configs[active]
    peft_type = _peft_type(peft_config)
    if peft_type not in ("PROMPT_TUNING", "PROMPT_TUNING_LORA"):
        raise TypeError(
            f"patch() without a config accelerates PROMPT_TUNING and PROMPT_TUNING_LORA models, "
            f"got peft_type {peft_type!r}"
        )
    encoder = model.prompt_encoder[active]
    base = model.base_model
    m = peft_config.num_virtual_tokens
    prompt = _tensor(encoder, "embedding")
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
    if peft_type == "PROMPT_TUNING":
        new = METHODS[PromptTuningConfig](PromptTuningConfig(m), weight)
        new.prompt = prompt
    else:
        lora_a, lora_b = _tensor(encoder, "lora_embedding_A"), _tensor(encoder, "lora_embedding_B")
        config = DePTConfig(
            num_virtual_tokens=m,
            r=peft_config.r,
            lora_alpha=peft_config.lora_alpha,
            max_length=peft_config.max_length,
        )
        scaling = getattr(encoder, "scaling", config.scaling)
        if abs(scaling - config.scaling) > 1e-12 * max(1.0, abs(config.scaling)):
            raise ValueError(
                f"prompt encoder scaling {scaling} differs from lora_alpha / sqrt(r) = "
                f"{config.scaling}"
            )
        expected = {
            "lora_embedding_A": (config.max_length, config.r),
            "lora_embedding_B": (config.r, embedding_shape(weight)[1]),
        }
        for name, tensor in (("lora_embedding_A", lora_a), ("lora_embedding_B", lora_b)):
            if tuple(full_shape(tensor)) != expected[name]:
                raise ValueError(
                    f"{name} has shape {tuple(full_shape(tensor))}, expected {expected[name]} from "
                    "peft_config (max_length, r, token_dim)"
                )
        new = METHODS[DePTConfig](config, weight)
        new.prompt, new.lora_a, new.lora_b = prompt, lora_a, lora_b
    state = _attach(
        model,
        base,
        models.architecture(base).install,
        new,
        freeze=False,
        trim_padding=trim_padding,
    )
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
