"""`toolkit generate RUN_DIR PROMPT`: one greedy answer from a run's model, streamed to the terminal.

The prompt is rendered exactly as training rendered a row (formatter, system prompt, pinned date), so the answer
shows what the adapter learned rather than how a different prompt format throws it off.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

from toolkit.commands.common import answer_length
from toolkit.data import encode, vision
from toolkit.errors import ToolkitError
from toolkit.evaluation import generation
from toolkit.io import files
from toolkit.runs import rundir
from toolkit.ui.report import console
from toolkit.ui.terminal import visible


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit generate", description="Answer one prompt with a run's model.")
    parser.add_argument("run_dir", help="a finished run directory (from toolkit sft)")
    parser.add_argument("prompt", help='the user turn; a typed "\\n" becomes a line break')
    parser.add_argument("--image", metavar="FILE", help="an image the question is about (vision models)")
    parser.add_argument("--base", action="store_true", help="answer with the base model (adapter switched off)")
    parser.add_argument("--max-new-tokens", type=answer_length, default=256, help="answer length limit (default 256)")
    return parser


def user_text(prompt: str) -> str:
    """Shells pass `\\n` through literally; users mean a line break (e.g. instruction, blank line, term)."""
    text = prompt.replace("\\n", "\n")
    if not text.strip():
        raise ToolkitError("PROMPT is empty; give the question to answer")
    return text


def check_image(path: str | None) -> None:
    """A one-line error before any model loads when --image is not a readable image."""
    if path:
        problem = vision.image_problem(files.expand(path))
        if problem:
            raise ToolkitError(f"--image: {problem}")


def prompt_ids(text: str, recipe, tokenizer, image: str | None = None) -> dict:
    """The question as one user turn, rendered as training rendered rows (system prompt, pinned date; with
    --image, the image first and no system prompt), with the image's inputs for the model."""
    prompt = encode.question_prompt(text, recipe.data, tokenizer, str(files.expand(image)) if image else None)
    images = rundir.image_inputs(recipe, tokenizer) if prompt.images else None
    if prompt.images and images is None:
        raise ToolkitError(f"--image: {recipe.model.name} is not a vision model; it cannot read images")
    return generation.prompt_batch(tokenizer, [prompt], "cpu", images)


def generate(model, tokenizer, encoded, max_new_tokens: int, base: bool) -> int:
    """Greedy decoding streamed as it goes; returns how many tokens were generated."""
    import torch
    from transformers import TextStreamer

    class VisibleStreamer(TextStreamer):
        """An answer is model output: control characters in it are shown as escapes, never sent to the terminal."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            super().on_finalized_text(visible(text), stream_end)

    streamer = VisibleStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    device = next(model.parameters()).device
    encoded = {key: value.to(device) for key, value in encoded.items()}
    with model.disable_adapter() if base else nullcontext(), torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                top_p=None, top_k=None, streamer=streamer, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=generation.stop_token_ids(model, tokenizer))
    return output.shape[1] - encoded["input_ids"].shape[1]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    text = user_text(args.prompt)
    check_image(args.image)
    model, tokenizer, recipe = rundir.load_trained(Path(args.run_dir))
    encoded = prompt_ids(text, recipe, tokenizer, args.image)
    which = "base model, adapter off" if args.base else "base + adapter"
    console.print(f"{args.run_dir} ({which}), greedy, at most {args.max_new_tokens} new tokens", style="dim",
                  markup=False, soft_wrap=True)
    started = time.time()
    count = generate(model, tokenizer, encoded, args.max_new_tokens, args.base)
    seconds = time.time() - started
    limit = " (stopped at --max-new-tokens)" if count >= args.max_new_tokens else ""
    console.print(f"[dim]{count} tokens in {seconds:.1f} s{limit}[/]")
    return 0
