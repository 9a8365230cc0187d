"""megadeep: Llama pre-training with Megatron-style tensor parallelism on DeepSpeed."""

__version__ = "0.1.0"
