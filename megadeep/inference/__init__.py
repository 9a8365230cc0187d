"""After pre-training: load a checkpoint of any layout for inference, generate text (KV cache,
greedy and sampled decoding, batches of prompts of different lengths) and evaluate loss."""
