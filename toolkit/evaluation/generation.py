"""Greedy generation from prompt token ids, shared by `eval`, `generate` and `merge`'s check.

Prompts arrive encoded by `toolkit.data.prompt` (exactly as training encoded the row), never as text
re-tokenized here, so special-token text in a question stays text at inference too.
"""

from __future__ import annotations

from toolkit.errors import ToolkitError
from toolkit.ui.report import progress_bar


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the generation config's eos ids (end_of_text, eom, eot) and the tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids += [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id))


def left_padded(tokenizer, prompts: list[list[int]], device):
    """A batch of prompts padded on the left, so every prompt's last token sits next to the first generated one.
    The side is given to this call only: the tokenizer's own `padding_side` (saved with a run) stays as it is."""
    return tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt").to(device)


def prompt_batch(tokenizer, prompts: list, device, images=None) -> dict:
    """Left-padded ids of `toolkit.data.encode.Encoded` prompts, with their image inputs when they have images."""
    batch = dict(left_padded(tokenizer, [p.input_ids for p in prompts], "cpu"))
    if any(p.images for p in prompts):
        if images is None:
            raise ToolkitError("these prompts have images, but the model has no vision tower to read them")
        batch = images.add(batch, [list(p.images) for p in prompts])
    return {key: value.to(device) for key, value in batch.items()}


def generate_answers(model, tokenizer, prompts: list, batch_size: int, max_new_tokens: int, label: str,
                     images=None) -> list[str]:
    """Greedy answers in the prompts' order; batches hold prompts of similar length so little is padding.
    `images` (toolkit.data.vision.ImageInputs) reads the images of prompts that have them."""
    import torch

    stop_ids = stop_token_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].input_ids))
    answers: list[str] = [""] * len(prompts)
    with progress_bar() as progress:
        task = progress.add_task(label, total=len(prompts), status="")
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = prompt_batch(tokenizer, [prompts[i] for i in batch], model.device, images)
            with torch.inference_mode():
                output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                        eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                answers[i] = text.strip()
            progress.update(task, advance=len(batch))
    return answers
