"""One module per command, each with `main(argv) -> int`; `toolkit.cli` only dispatches to them."""
