"""`toolkit COMMAND ...`: one module per command, each with `main(argv) -> int`; this file only dispatches.

Every failure ends as one line on the terminal and an exit code: 2 for a problem the user can fix (a
`ToolkitError`, or the operating system refusing a file: disk full, read-only, no permission), 1 for an error in the
toolkit itself, 130 for Ctrl-C. `toolkit --debug COMMAND ...` (or `--debug` anywhere among a command's options)
prints the traceback as well.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import signal
import sys
import traceback
import warnings
from contextlib import contextmanager

COMMANDS = {
    "sft": "Fine-tune with LoRA as a recipe says.",
    "validate": "Check a recipe, its data and its LoRA targets without training.",
    "eval": "Measure term accuracy of a run (and of its base model).",
    "extract": "Write a run's adapter state_dict to one file.",
    "merge": "Merge a run's adapter into its base model and save a full model.",
    "generate": "Answer one prompt with a run's model.",
    "bench": "Measure training speed and memory of a recipe's setup (GPU).",
    "new-recipe": "Write recipes/NAME.yaml for a new domain from the construction recipe, then validate it.",
}

DEBUG_FLAG = "--debug"
DEBUG_ENV = "TOOLKIT_DEBUG"  # set while a command runs with --debug, so processes it starts show tracebacks too

# Messages a normal run prints that tell the user nothing they can act on, by the logger or warning that carries
# them (each a regular expression the whole message must start with). Everything else, PEFT's other warnings
# included, stays visible, and `--debug` shows these too.
NOISY_LOGGERS = {
    # bitsandbytes tries an optional CPU kernel package at import time and logs when it is absent.
    "bitsandbytes.backends.cpu.ops": [r"Failed to load CPU gemm_4bit_forward from kernels-community"],
    # logged on every forward pass of an 8-bit layer whose input is not fp16 (all of them in fp32 and bf16 runs).
    "bitsandbytes.autograd._functions": [r"MatMul8bitLt: inputs will be cast from"],
    # checkpoints saved less than a second apart (small models, short save_steps); numbered order is used, as intended.
    "transformers.trainer_utils": [r"mtime may not be reliable on this filesystem"],
    # bitsandbytes asks the kernels package for an optional kernel at import; offline it says it cannot check
    # the publisher of a kernel the toolkit never uses.
    "kernels._internals.hf_hub": [r"Skipping publisher trust check for '.*' because Hugging Face Hub is in offline"],
    # the tokenizer's own limit (model_max_length), said once for the first long row; the toolkit cuts or drops
    # rows at train.max_seq_length and the plan counts them ("train rows too long").
    "transformers.tokenization_utils_base": [r"Token indices sequence length is longer than the specified maximum"],
    # Liger's optional CuTe DSL backends need a package the GPU extra does not install; Liger falls back to its
    # Triton kernels, which the toolkit uses.
    "liger_kernel.backends.registry": [r"Backend impl '[^']*\._cutedsl[^']*' for op '[^']*' could not be imported"],
}
NOISY_WARNINGS = [
    # PEFT and TRL read transformers' deprecated alias on every model they wrap; the user cannot change that.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # PEFT saves the embedding adapters a recipe targets (lora.targets: [..., embed_tokens]), as asked.
    (UserWarning, r"Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`"),
    # PIL's guard against images over ~89 megapixels; a large photo is a photo here, and an image past PIL's hard
    # limit is refused as unreadable with its row.
    (RuntimeWarning, r"Image size \(\d+ pixels\) exceeds limit of \d+ pixels, could be decompression bomb"),
]


def usage() -> str:
    lines = ["usage: toolkit [--debug] COMMAND [options]   (toolkit COMMAND --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def set_environment() -> None:
    """Defaults the libraries read when they are imported (a user's own setting wins)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Rows of varying length make the CUDA caching allocator fragment (measured: 116 GiB reserved for a
    # 77 GiB peak); growable segments let the same run fit a smaller GPU.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class DropMessage(logging.Filter):
    """Drops one logger's records whose message matches a known pattern, and nothing else."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: not ours to judge
            return True
        return not any(p.match(message) for p in self.patterns)


_bars_env_ours = []  # [True] once hide_known_noise set HF_DATASETS_DISABLE_PROGRESS_BARS (a user's own is left alone)


def hide_known_noise(debug: bool = False) -> None:
    """Hide exactly the messages in NOISY_LOGGERS and NOISY_WARNINGS, and the datasets progress bars TRL's data
    preparation would draw beside the toolkit's own; with `debug`, show them all again."""
    for name, patterns in NOISY_LOGGERS.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, DropMessage)]:
            logger.removeFilter(old)
        if not debug:
            logger.addFilter(DropMessage(patterns))
    for category, message in NOISY_WARNINGS:
        if debug:
            warnings.filters[:] = [f for f in warnings.filters
                                   if not (f[0] == "ignore" and f[1] is not None and f[1].pattern == message
                                           and f[2] is category)]
        else:
            warnings.filterwarnings("ignore", message=message, category=category)
    # datasets reads the variable when it is imported; importing it here only to switch the bars off cost every
    # command a second, and validate never imports it
    loaded = sys.modules.get("datasets")
    if debug:
        if _bars_env_ours:
            os.environ.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
            _bars_env_ours.clear()
        # a datasets imported while the variable was set keeps its bars off for good (and warns when asked to turn
        # them on): a --debug command after a plain one in the same process (a notebook) cannot show them
        pinned = getattr(sys.modules.get("datasets.utils.tqdm"), "HF_DATASETS_DISABLE_PROGRESS_BARS", None) is True
        if loaded is not None and not pinned:
            loaded.enable_progress_bars()
    else:
        if "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ:
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
            _bars_env_ours.append(True)
        if loaded is not None:
            loaded.disable_progress_bars()


def os_error_message(err: OSError) -> str:
    """One line for the operating system refusing a file: which file, what happened, what to do."""
    where = f"{err.filename}: " if err.filename else ""
    advice = {
        errno.ENOSPC: "the disk is full: free space, then run the command again (an interrupted sft continues with "
                      "--resume)",
        errno.EDQUOT: "the disk quota is used up: free space, then run the command again",
        errno.EROFS: "that file system is read-only: choose a writable location",
        errno.EACCES: "check the file's permissions or choose another location",
        errno.EPERM: "check the file's permissions or choose another location",
    }.get(err.errno, "check the path and the disk, then run the command again")
    return f"{where}{err.strerror or err}; {advice}"


def print_error(message: str, label: str = "error:") -> None:
    """The message as plain text: a path or data text holding `[bold]` or escape sequences is shown, never
    interpreted."""
    from rich.text import Text

    from toolkit.ui.report import console
    from toolkit.ui.terminal import visible

    console.print(Text.assemble((label, "bold red"), " ", visible(message)), soft_wrap=True)


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """argv without `--debug`, and whether it was there (before the command or among its options)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:cut] or os.environ.get(DEBUG_ENV) == "1"
    return [a for a in argv[:cut] if a != DEBUG_FLAG] + argv[cut:], debug


@contextmanager
def debug_environment(debug: bool):
    """Mark the environment while the command runs, so training processes it starts report the same way."""
    before = os.environ.get(DEBUG_ENV)
    if debug:
        os.environ[DEBUG_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = before


def run_command(name: str, argv: list[str], debug: bool) -> int:
    """Run one command and turn every way it can fail into one line and an exit code."""
    from toolkit.errors import ToolkitError, first_line
    from toolkit.io.files import says_disk_full

    try:
        set_environment()
        hide_known_noise(debug)
        module = importlib.import_module(f"toolkit.commands.{name.replace('-', '_')}")
        return module.main(argv)
    except ToolkitError as err:
        return failed(str(err), 2, debug)
    except OSError as err:
        return failed(os_error_message(err), 2, debug)
    except SystemExit as exit_:  # argparse's --help and usage errors
        return exit_.code if isinstance(exit_.code, int) else 1
    except KeyboardInterrupt:
        print_error("stopped by Ctrl-C", label="interrupted:")
        return 130
    except Exception as err:
        first = first_line(err, 300)
        if says_disk_full(err):
            return failed(f"{first}; the disk is full: free space, then run the command again", 2, debug)
        hint = "" if debug else f"; run it again as toolkit --debug {name} ... to see where, and report it"
        return failed(f"unexpected {type(err).__name__} in toolkit {name}: {first}{hint}", 1, debug)


def failed(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print_error(message)
    return code


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from toolkit import __version__

        print(f"toolkit {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    with debug_environment(debug):
        return run_command(name, argv[1:], debug)


def entry() -> None:
    code = main()
    # The command has finished and its exit code stands: a Ctrl-C while Python shuts down (which can take a while
    # after torch) would otherwise end the process by SIGINT (-2) instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
