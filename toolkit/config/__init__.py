"""The recipe: its typed schema, and its translation into the configs of TRL, PEFT and transformers."""
