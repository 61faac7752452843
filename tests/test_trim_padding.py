"""Padding trim: a patched model cuts the columns that the attention mask marks
padding in every row before the fused op, and gives what the untrimmed model gives.

Each case runs two copies of one patched model with the same adapter values: one patched
with `trim_padding=False` (the untrimmed reference) and one as configured. Loss, every
adapter gradient and the outputs the caller reads must agree to fp32 rounding (1e-5
relative); a spy on the adapter's call records how many columns reached the fused op, so a
case that should trim and did not fails too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import (
    BASE_CLASSES,
    CLS_CLASSES,
    DECODERS,
    EOS,
    PAD,
    VOCAB,
    batch,
    make_config,
    randomize,
    tiny_model,
)
from helpers.peft_models import OfficialDePTStandIn, peft_prompt_tuning
from torch import Tensor
from transformers import T5EncoderModel

import dept_kernels as dk
from dept_kernels.models import t5 as t5_hooks


def close(actual: Tensor, expected: Tensor, name: str = "") -> None:
    """Equal to fp32 rounding: 1e-5 relative, to the reference's largest magnitude (as
    `helpers.assert_close`; the wide PEFT T5 has gradients in the thousands)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, atol=1e-5 * scale, rtol=1e-5, msg=lambda text: f"{name}: {text}"
    )


S = 12
LENGTHS = (7, 5, 3)  # the longest row has 7 tokens: 5 of the 12 columns are padding

CLS = CLS_CLASSES
BASE = BASE_CLASSES
# (arch, head): "lm" the LM head (T5: encoder-decoder), "cls" the sequence-classification
# head, "enc" T5EncoderModel, "base" the decoder-only base model.
HEADS = [
    ("t5", "lm"),
    ("t5", "cls"),
    ("t5", "enc"),
    *[(arch, head) for arch in DECODERS for head in ("lm", "cls", "base")],
]
PADDINGS = ("right", "left", "unpadded", "mask-none")


def model_class(arch: str, head: str):
    return {"cls": CLS.get(arch), "enc": T5EncoderModel, "base": BASE.get(arch)}.get(head)


def pair(arch: str, head: str, method: str, trim: bool | None = None):
    """(untrimmed model, model patched with `trim_padding=trim`), same adapter values."""
    base = tiny_model(arch, model_class(arch, head))
    config = make_config(method)
    untrimmed = dk.patch(copy.deepcopy(base), config, trim_padding=False)
    randomize(untrimmed.dept_adapter)
    model = dk.patch(copy.deepcopy(base), config, trim_padding=trim)
    model.dept_adapter.load_state_dict(untrimmed.dept_adapter.state_dict())
    return untrimmed, model


def spy(model) -> list[int]:
    """The number of id columns of each call of `model`'s fused op, appended as it runs."""
    seen: list[int] = []
    dk.adapter(model).register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    return seen


def padded_batch(padding: str, head: str, seed: int = 0):
    """ids, mask (None for "mask-none") and labels of 3 rows of 12 columns."""
    ids, mask, _ = batch(seed=seed, s=S)
    if padding in ("right", "left"):
        for row, n in enumerate(LENGTHS):
            real = slice(0, n) if padding == "right" else slice(S - n, S)
            keep = torch.zeros(S, dtype=torch.bool)
            keep[real] = True
            ids[row][~keep], mask[row][~keep] = PAD, 0
            if head == "cls":
                ids[row, real.stop - 1] = EOS  # T5 pools each row's one <eos>
    elif head == "cls":
        ids[:, -1] = EOS
    if head == "cls":
        labels = torch.tensor([0, 1, 1])
    else:  # T5's targets; decoder-only LMs take their ids (`run`)
        labels = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(seed))
    return ids, (None if padding == "mask-none" else mask), labels


def run(arch: str, head: str, model, ids, mask, labels):
    """(loss, the outputs the caller reads), loss backpropagated."""
    if head in ("enc", "base"):
        out = model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state
        m = hidden.shape[1] - ids.shape[1]
        weights = torch.ones(ids.shape) if mask is None else mask.float()
        weights = torch.cat([torch.ones(len(ids), m), weights], 1)
        loss = (hidden.pow(2).sum(-1) * weights).sum() / weights.sum()  # masked mean pooling
        loss.backward()
        return loss, {"last_hidden_state": hidden}
    if head == "lm" and arch != "t5":
        lm_labels = ids.clone()
        if mask is not None:
            lm_labels[mask == 0] = -100  # HF's collators ignore the padding
        out = model(input_ids=ids, attention_mask=mask, labels=lm_labels)
        out.loss.backward()
        return out.loss, {"logits": out.logits}
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    read = {"logits": out.logits}
    if arch == "t5" and head == "lm":
        read["encoder_last_hidden_state"] = out.encoder_last_hidden_state
    return out.loss, read


def expected_columns(arch: str, head: str, padding: str) -> int:
    if padding == "right":
        return max(LENGTHS)
    if padding == "left" and arch != "t5":
        # An LM keeps one padding column: its logits predict the first kept label.
        return max(LENGTHS) + (head == "lm")
    return S  # T5 keeps leading columns (its relative positions); nothing else to cut


def kept_columns(arch: str, head: str, padding: str) -> torch.Tensor:
    """Column indices (of the caller's S) that the trimmed run computes."""
    n = expected_columns(arch, head, padding)
    return torch.arange(S - n, S) if padding == "left" else torch.arange(n)


def assert_same(arch, head, padding, untrimmed, model, got, want):
    m = dk.adapter(model).num_virtual_tokens
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        per_column = name != "logits" or (arch != "t5" and head == "lm")
        if per_column:
            # Per input column: the cut columns are padding in every row and read zeros.
            cols = torch.cat([torch.arange(m), m + kept_columns(arch, head, padding)])
            cut = torch.ones(value.shape[1], dtype=torch.bool)
            cut[cols] = False
            close(got[name][:, cols], value[:, cols], name)
            assert torch.all(got[name][:, cut] == 0), name
        else:
            close(got[name], value, name)
    reference = dict(untrimmed.dept_adapter.named_parameters())
    for name, param in model.dept_adapter.named_parameters():
        assert reference[name].grad.abs().sum() > 0, name
        close(param.grad, reference[name].grad, name)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("method", ["dept", "pt", "ept"])
@pytest.mark.parametrize(("arch", "head"), HEADS, ids=[f"{a}-{h}" for a, h in HEADS])
def test_trimmed_equals_untrimmed(arch, head, method, padding):
    # Decoder-only LM and base models trim when asked (their outputs are per input position).
    trim = True if head in ("lm", "base") and arch != "t5" else None
    untrimmed, model = pair(arch, head, method, trim)
    ids, mask, labels = padded_batch(padding, head)
    seen, seen_untrimmed = spy(model), spy(untrimmed)
    want_loss, want = run(arch, head, untrimmed, ids, mask, labels)
    got_loss, got = run(arch, head, model, ids, mask, labels)
    assert seen == [expected_columns(arch, head, padding)]
    assert seen_untrimmed == [S]
    close(got_loss, want_loss)
    assert_same(arch, head, padding, untrimmed, model, got, want)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("head", ["lm", "cls"])
def test_left_padding_with_position_ids(arch, head):
    """Given positions (each token's rank among the real ones) are cut with the ids."""
    untrimmed, model = pair(arch, head, "dept", trim=True)
    ids, mask, labels = padded_batch("left", head)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    seen = spy(model)
    outs = []
    for m in (untrimmed, model):
        kwargs = {"labels": labels} if head == "cls" else {}
        out = m(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs)
        (out.loss if head == "cls" else out.logits.pow(2).mean()).backward()
        outs.append(out.logits)
    assert seen == [max(LENGTHS)]
    n = dk.adapter(model).num_virtual_tokens + S - max(LENGTHS)
    if head == "lm":
        close(outs[1][:, n:], outs[0][:, n:])
    else:
        close(outs[1], outs[0])
        for name, p in model.dept_adapter.named_parameters():
            ref = dict(untrimmed.dept_adapter.named_parameters())[name].grad
            close(p.grad, ref, name)


@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_lm_is_opt_in(arch):
    """By default an LM head's per-position outputs are the untrimmed ones, all of them."""
    untrimmed, model = pair(arch, "lm", "pt")
    ids, mask, _ = padded_batch("right", "lm")
    seen = spy(model)
    got = model(input_ids=ids, attention_mask=mask).logits
    assert seen == [S]
    torch.testing.assert_close(got, untrimmed(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("arch", DECODERS)
def test_lm_labels_on_padding_keep_their_columns(arch):
    """Labels that are not -100 on padding columns count in the loss: those stay."""
    untrimmed, model = pair(arch, "lm", "dept", trim=True)
    ids, mask, _ = padded_batch("right", "lm")
    labels = ids.clone()
    labels[:, 9:] = -100  # columns 9..11 ignored, 7..8 padding with labels
    seen = spy(model)
    want = untrimmed(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert seen == [9]
    close(got, want)


@pytest.mark.parametrize("arch", DECODERS)
def test_cls_pools_where_hf_pools(arch):
    """HF's head pools the last id that is not the pad id: columns that hold other ids under
    a zero mask, or an all-padding row (pooled at column 0), keep the columns it reads."""
    untrimmed, model = pair(arch, "cls", "dept")
    ids, mask, _ = padded_batch("right", "cls")
    ids[0, 9] = 5  # masked, but the head pools it: columns 7..9 stay
    seen = spy(model)
    want = untrimmed(input_ids=ids, attention_mask=mask).logits
    close(model(input_ids=ids, attention_mask=mask).logits, want)
    ids, mask, _ = padded_batch("left", "cls")
    ids[2], mask[2] = PAD, 0  # an all-padding row: no leading cut
    want = untrimmed(input_ids=ids, attention_mask=mask).logits
    close(model(input_ids=ids, attention_mask=mask).logits, want)
    assert seen == [10, S]


def test_switch_off_and_aot():
    _, model = pair("t5", "lm", "dept", trim=False)
    ids, mask, labels = padded_batch("right", "lm")
    seen = spy(model)
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert seen == [S]
    with pytest.raises(ValueError, match="trim_padding applies to the prompt methods"):
        dk.patch(tiny_model("t5"), dk.AoTConfig("kron", r=2), trim_padding=True)


def test_t5_calls_that_keep_every_column():
    """Attention maps, tuple outputs and a requested cache: the call runs untrimmed."""
    _, model = pair("t5", "lm", "dept")
    ids, mask, labels = padded_batch("right", "lm")
    seen = spy(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_attentions=True)
    assert out.encoder_attentions[0].shape[-1] == 4 + S
    model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True)
    assert out.past_key_values is not None
    assert seen == [S, S, S]
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert seen[-1] == max(LENGTHS) and out.past_key_values is None


def test_t5_reads_the_mask_once_per_forward(monkeypatch):
    calls = []
    real = t5_hooks.checked_cut

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(t5_hooks, "checked_cut", counted)
    _, model = pair("t5", "lm", "dept")
    ids, mask, labels = padded_batch("right", "lm")
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert len(calls) == 1
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert len(calls) == 2  # the encoder call; the decoding steps read nothing


@pytest.mark.parametrize("num_beams", [1, 3])
def test_t5_generate_runs_the_encoder_trimmed(num_beams):
    untrimmed, model = pair("t5", "lm", "dept")
    ids, mask, _ = padded_batch("right", "lm")
    seen = spy(model)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams}
    want = untrimmed.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert seen == [max(LENGTHS)]
    assert torch.equal(got, want)
    assert len(set(got.flatten().tolist())) > 1


@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_generate_with_trim_on(arch):
    """Generation never trims (the KV cache spans the caller's columns): same tokens."""
    untrimmed, model = pair(arch, "lm", "dept", trim=True)
    ids, mask, _ = padded_batch("left", "lm")
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    want = untrimmed.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), want)


# --------------------------------------------------------------------------- PEFT models


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_peft_prompt_tuning(arch):
    """`dk.patch(peft_model)` trims (GPT-2's LM head when asked) and gives PEFT's numbers."""
    model = peft_prompt_tuning(arch, 1)
    reference = copy.deepcopy(model)
    ids, mask, labels = padded_batch("right", "lm")
    if arch != "t5":
        labels = ids.masked_fill(mask == 0, -100)
    want = reference(input_ids=ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    dk.patch(model, trim_padding=True if arch != "t5" else None)
    seen = spy(model)
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    got.loss.backward()
    assert seen == [max(LENGTHS)]
    close(got.loss, want.loss)
    m = 6
    cols = slice(None) if arch == "t5" else slice(0, m + max(LENGTHS))
    assert got.logits.shape == want.logits.shape
    close(got.logits[:, cols], want.logits[:, cols])
    mine = model.prompt_encoder["default"].embedding.weight.grad
    theirs = reference.prompt_encoder["default"].embedding.weight.grad
    close(mine, theirs)


def test_peft_t5_generate():
    model = peft_prompt_tuning("t5", 1)
    ids, mask, _ = padded_batch("right", "lm")
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    theirs = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    dk.patch(model)
    seen = spy(model)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), theirs)
    assert seen == [max(LENGTHS)]


def official_batch(seed: int = 0, max_length: int = 12):
    """Rows of GLUE-like varied lengths, padded to max_length as the official code does."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 8, (4,), generator=gen)
    ids = torch.randint(2, VOCAB, (4, max_length), generator=gen)
    mask = (torch.arange(max_length) < lengths[:, None]).long()
    labels = torch.randint(2, VOCAB, (4, 3), generator=gen)
    return ids * mask, mask, labels, int(lengths.max())


def test_official_dept_patched_in_place():
    model = OfficialDePTStandIn(tiny_model("t5"))
    reference = copy.deepcopy(model)
    ids, mask, labels, longest = official_batch()
    want = reference(input_ids=ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    dk.patch(model)
    seen = spy(model)
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    got.loss.backward()
    assert seen == [longest] and longest < 12
    close(got.loss, want.loss)
    close(got.logits, want.logits)
    assert got.encoder_last_hidden_state.shape == want.encoder_last_hidden_state.shape
    enc, ref = model.prompt_encoder["default"], reference.prompt_encoder["default"]
    for name in ("embedding", "lora_embedding_A", "lora_embedding_B"):
        mine, theirs = getattr(enc, name), getattr(ref, name)
        mine, theirs = getattr(mine, "weight", mine), getattr(theirs, "weight", theirs)
        assert theirs.grad.abs().sum() > 0, name
        close(mine.grad, theirs.grad, name)


def test_trainer_with_a_max_length_collator(tmp_path):
    """Under the HF Trainer, a collator padding every batch to max_length: the same losses
    and parameters as the untrimmed model, step by step, from trimmed batches."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Examples(Dataset):
        def __init__(self) -> None:
            gen = torch.Generator().manual_seed(0)
            self.rows = []
            for n in torch.randint(2, 9, (12,), generator=gen).tolist():
                ids = torch.randint(2, VOCAB, (n,), generator=gen)
                self.rows.append((ids, torch.randint(2, VOCAB, (3,), generator=gen)))

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.rows[i][0], "labels": self.rows[i][1]}

    def pad_to_max_length(features: list[dict]) -> dict:
        ids = torch.full((len(features), 16), PAD)
        mask = torch.zeros(len(features), 16, dtype=torch.long)
        for row, f in enumerate(features):
            ids[row, : len(f["input_ids"])] = f["input_ids"]
            mask[row, : len(f["input_ids"])] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.stack([f["labels"] for f in features]),
        }

    def train(model) -> tuple[list[float], dict]:
        args = TrainingArguments(
            output_dir=str(tmp_path / str(id(model))),
            per_device_train_batch_size=4,
            max_steps=3,
            report_to="none",
            use_cpu=True,
            remove_unused_columns=False,
            save_strategy="no",
            seed=0,
        )
        losses: list[Tensor] = []  # the Trainer logs them rounded to 4 digits: taken here
        model.register_forward_hook(lambda mod, args, out: losses.append(out.loss.detach()))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Examples(),
            data_collator=pad_to_max_length,
            optimizers=(optimizer, None),
        )
        trainer.train()
        return losses, {n: p.detach().clone() for n, p in model.dept_adapter.named_parameters()}

    untrimmed, model = pair("t5", "lm", "dept")
    start = {n: p.detach().clone() for n, p in model.dept_adapter.named_parameters()}
    seen = spy(model)
    want_losses, want = train(untrimmed.train())
    got_losses, got = train(model.train())
    assert len(seen) == 3 and max(seen) < 16
    assert len(want_losses) == 3
    close(torch.stack(got_losses), torch.stack(want_losses))
    for name, value in want.items():
        assert not torch.equal(value, start[name]), name
        close(got[name], value, name)


@pytest.mark.parametrize(("arch", "head"), [("t5", "lm"), ("gpt2", "cls")])
def test_compiled_forward_does_not_trim(arch, head):
    """Under torch.compile(fullgraph=True) the trim is skipped (its shapes would depend on
    the mask's values): no graph break, and the numbers of the eager, trimmed run."""
    torch._dynamo.reset()
    _, model = pair(arch, head, "dept")
    model.train()
    ids, mask, labels = padded_batch("right", head)

    def loss(**kw):
        return model(**kw).loss

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    seen = spy(model)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    want = loss(**inputs)
    got = compiled(**inputs)
    assert seen[0] == max(LENGTHS)
    close(got, want)
