"""torchtitan 0.3's Llama 3 model at a benchmark shape, built on CPU (for bench.train_throughput).

torchtitan's trainer assumes CUDA, so only its model class is used. Two 0.3.0 quirks are worked around:
its expert-parallel module imports triton kernels eagerly (stubbed: the dense model never calls them;
a stub ``triton`` itself would break torch._dynamo), and its config checks refuse plain SDPA for
language models, so the layers are given its ``ScaledDotProductAttention`` block directly.
"""
from __future__ import annotations

import sys
import types


def build(s: dict):
    stub = types.ModuleType("torchtitan.distributed.minimal_async_ep.kernels")
    stub.__getattr__ = lambda name: None
    sys.modules.setdefault(stub.__name__, stub)
    import torch
    import torchtitan.models.llama3 as llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    llama3.get_attention_config = lambda backend: ScaledDotProductAttention.Config()
    d, v = s["dim"], s["vocab_size"]
    cfg = llama3.Llama3Model.Config(
        dim=d, vocab_size=v,
        tok_embeddings=Embedding.Config(num_embeddings=v, embedding_dim=d, param_init=llama3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=d, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(in_features=d, out_features=v, param_init=llama3._output_linear_init(d)),
        layers=llama3._build_llama3_layers(
            fuse_qkv=True, n_layers=s["n_layers"], dim=d, n_heads=s["n_heads"], hidden_dim=s["ffn_dim"],
            rope=ComplexRoPE.Config(dim=d // s["n_heads"], max_seq_len=s["seq_len"], theta=10000.0),
            attn_backend="sdpa",
        ),
    )
    model = cfg.build()
    model.init_states(buffer_device=torch.device("cpu"))
    return model
