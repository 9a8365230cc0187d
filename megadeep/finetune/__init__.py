"""Fine-tuning on the pre-training stack: start from a checkpoint, LoRA adapters on the TP layers,
PEFT export and merge, chat-format SFT data."""
