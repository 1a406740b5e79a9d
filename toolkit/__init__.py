"""Fine-tune Llama 3 chat models (Llama 3.2 Vision first) with LoRA through TRL, offline."""

__version__ = "0.1.0"
