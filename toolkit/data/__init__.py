"""Data rows: reading files, formatters, checks, chat-template encoding, images, batching, the row store, replay."""
