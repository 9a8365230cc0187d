"""Checkpoints that never lose work: a safetensors + JSON format keyed by canonical parameter names,
atomic saves with a sha256 manifest, resume into any layout, Hugging Face import/export."""
