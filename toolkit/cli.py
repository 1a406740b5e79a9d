"""`toolkit COMMAND ...`: one module per command, each with `main(argv) -> int`; this file only dispatches."""

from __future__ import annotations

import importlib
import os
import sys
import warnings

COMMANDS = {
    "sft": "Fine-tune with LoRA as a recipe says.",
    "validate": "Check a recipe, its data and its LoRA targets without training.",
    "eval": "Measure term accuracy of a run (and of its base model).",
    "extract": "Write a run's adapter state_dict to one file.",
    "merge": "Merge a run's adapter into its base model and save a full model.",
    "generate": "Answer one prompt with a run's model.",
    "bench": "Measure training speed and memory of a recipe's setup (GPU).",
}


def usage() -> str:
    lines = ["usage: toolkit COMMAND [options]   (toolkit COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def quiet_libraries() -> None:
    """Keep the terminal for what the user asked for: library chatter at warning level and below is hidden."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Rows of varying length make the CUDA caching allocator fragment (measured: 116 GiB reserved for a
    # 77 GiB peak); growable segments let the same run fit a smaller GPU.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    from toolkit.errors import ToolkitError
    from toolkit.report import console

    try:
        quiet_libraries()
        module = importlib.import_module(f"toolkit.commands.{name}")
        return module.main(argv[1:])
    except ToolkitError as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        return 2
    except SystemExit as exit_:  # argparse's --help and usage errors
        return exit_.code if isinstance(exit_.code, int) else 1
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        return 130


def entry() -> None:
    sys.exit(main())
