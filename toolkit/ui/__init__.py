"""The terminal: tables, progress bars, JSON results, previews, visible text."""
