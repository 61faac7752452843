"""Train DePT on a random tiny T5 with the Hugging Face Trainer, offline, in seconds.

The task is synthetic: the target is token 2 + (first input id mod 2), then </s>. The
optimizer has DePT's two groups (soft prompt at a high learning rate, the low-rank pair at a
low one) from `dept_kernels.param_groups`; the adapter is saved and reloaded at the end.

    python examples/train_dept_t5_trainer.py
"""

from __future__ import annotations

import copy
import tempfile

import torch
from transformers import T5Config, T5ForConditionalGeneration, Trainer, TrainingArguments

import dept_kernels as dk

VOCAB = 128


class SyntheticTask(torch.utils.data.Dataset):
    def __init__(self, size: int, seq_len: int = 12, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, VOCAB, (size, seq_len), generator=gen)
        self.ids[:, 0] = 10 + torch.randint(0, 2, (size,), generator=gen)
        self.labels = torch.stack([2 + self.ids[:, 0] % 2, torch.ones(size, dtype=torch.long)], 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


def main() -> None:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    base = T5ForConditionalGeneration(config)
    model = copy.deepcopy(base)  # `base` stays unpatched, to reload the adapter onto
    m, r = dk.equal_budget(prompt_length=20, d=config.d_model, max_length=32, num_virtual_tokens=8)
    dk.patch(model, dk.DePTConfig(num_virtual_tokens=m, r=r, max_length=32))
    print(f"DePT m={m} r={r}: {sum(p.numel() for p in model.dept_adapter.parameters())} params")

    optimizer = torch.optim.AdamW(dk.param_groups(model, prompt_lr=0.3, lowrank_lr=1e-3))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=100, per_device_train_batch_size=32, logging_steps=20,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=SyntheticTask(4096),
                          optimizers=(optimizer, None))  # fmt: skip
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        # The task is learnable from the prompt and the delta alone: training must show it.
        assert losses[-1] < 0.8 * losses[0], f"the training loss did not fall: {losses}"

        dk.save_adapter(model, out)
        fresh = dk.load_adapter(base, out)
    held_out = SyntheticTask(64, seed=1)[:]  # tensors stacked over 64 examples
    with torch.no_grad():
        loss = model.eval()(**held_out).loss.item()
        reloaded = fresh.eval()(**held_out).loss.item()
    print(f"held-out loss {loss:.4f}, after save/load {reloaded:.4f}")
    # The saved adapter is the trained one: the reloaded model computes the same loss.
    assert abs(reloaded - loss) <= 1e-5 * max(1.0, abs(loss)), (loss, reloaded)


if __name__ == "__main__":
    main()
