"""The Llama-style decoder, written once; pipeline and parallel forms are derived from it."""
from megadeep.model.accounting import num_params
from megadeep.model.llama import Block, Transformer, init_weights

__all__ = ["Block", "Transformer", "init_weights", "num_params"]
