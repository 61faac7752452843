"""DePT on CLIP-T5 (the DePT paper's VQA / MSCOCO setting), offline, in seconds.

A frozen CLIP vision encoder's features pass through a trainable linear projection to T5's
width d; the patched T5 takes them as `visual_embeds` and runs its encoder on
`[prompt; E[ids] + low-rank delta; visual rows]`. Both models are random and tiny (built from
configs, nothing is downloaded). The task is synthetic: each image is one of four colours
plus noise, the question is random tokens, the answer is token 10 + colour, then </s>, so
only the visual rows can tell the answer. Three parameter groups: the soft prompt and the
low-rank pair (`dept_kernels.param_groups`), and the projection.

    python examples/dept_clip_t5.py
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration

import dept_kernels as dk

VOCAB, COLOURS, ANSWER0, EOS = 128, 4, 10, 1


def synthetic_batch(size: int, gen: torch.Generator, q_len: int = 8):
    """(images (B, 3, 32, 32), question ids (B, q_len), answer labels (B, 2))."""
    colour = torch.randint(0, COLOURS, (size,), generator=gen)
    palette = torch.eye(3).repeat(2, 1)[:COLOURS] * 2 - 1  # four distinct RGB directions
    images = palette[colour][:, :, None, None] + 0.3 * torch.randn(size, 3, 32, 32, generator=gen)
    questions = torch.randint(2, VOCAB, (size, q_len), generator=gen)
    answers = torch.stack([ANSWER0 + colour, torch.full((size,), EOS)], dim=1)
    return images, questions, answers


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8,
        )
    ).eval()  # fmt: skip
    vision.requires_grad_(False)  # frozen, as in CLIP-T5
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=VOCAB, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS,
        )
    )  # fmt: skip
    model = dk.patch(t5, dk.DePTConfig(num_virtual_tokens=8, r=4, max_length=16))
    projection = torch.nn.Linear(vision.config.hidden_size, t5.config.d_model)

    groups = dk.param_groups(model, prompt_lr=0.3, lowrank_lr=1e-3)
    groups.append({"params": list(projection.parameters()), "lr": 3e-3, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    print(f"{len(groups)} parameter groups: prompt, low-rank pair, projection")

    def visual_rows(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = vision(pixel_values=images).last_hidden_state  # (B, 1 + patches, 32)
        return projection(features)  # (B, n_v, d): trained through the fused op's gradient

    model.train()
    losses = []
    for step in range(60):
        images, questions, answers = synthetic_batch(32, gen)
        visual = visual_rows(images)
        out = model(
            input_ids=questions,
            attention_mask=torch.ones_like(questions),
            labels=answers,
            visual_embeds=visual,
            visual_attention_mask=torch.ones(visual.shape[:2], dtype=torch.long),
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
        if step % 15 == 0 or step == 59:
            print(f"step {step:2d} loss {losses[-1]:.3f}")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"training loss {first:.3f} -> {last:.3f}")
    assert last < first, "training did not lower the loss"

    model.eval()
    images, questions, answers = synthetic_batch(8, gen)
    with torch.no_grad():
        generated = model.generate(
            input_ids=questions, visual_embeds=visual_rows(images), max_new_tokens=2, num_beams=2
        )
    predicted = generated[:, 1]  # after the decoder start token
    print(f"answers  {answers[:, 0].tolist()}")
    print(f"generate {predicted.tolist()}")
    correct = (predicted == answers[:, 0]).sum().item()
    print(f"generate: {correct}/{len(predicted)} answers correct")


if __name__ == "__main__":
    main()
