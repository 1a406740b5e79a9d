"""Loading models and tokenizers, LoRA adapters and their fused path, the vision tower, the built-in tiny model."""
