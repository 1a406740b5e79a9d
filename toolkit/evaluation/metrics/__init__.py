"""Local `evaluate` metric scripts for `toolkit eval`, each loaded with `evaluate.load(str(path))`."""
