"""The Llama-style decoder, written once; pipeline and parallel forms are derived from it."""
from megadeep.model.llama import Block, Transformer, init_weights, num_params

__all__ = ["Block", "Transformer", "init_weights", "num_params"]
