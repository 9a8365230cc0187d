"""Per-GPU memory of a training layout: model states (ZeRO), activations (Korthikanti et al.), buffers.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, §3.1 and §5): with Ψ parameters on a
rank and mixed-precision Adam, 2Ψ bytes of parameters + 2Ψ of gradients + KΨ of optimizer states
(K = 12: fp32 master copy, momentum, variance); ZeRO stage 1 divides the optimizer term by the
data-parallel degree N_d, stage 2 also the gradients, stage 3 also the parameters. In fp32 training
Adam needs no master copy (K = 8), but DeepSpeed's ZeRO optimizers clone the fp32 partition anyway,
so K = 12 again from stage 1 on: the formula follows what DeepSpeed allocates (measured by
``megadeep memory``, see tests/test_ds_configs.py).

Activations generalise Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", §4) from GPT's block to ours (GQA, gated MLP, optional dropout): for GPT
shapes it is exactly their sbh(34 + 5as/h) per layer, sbh(10 + 24/t + 5as/(ht)) under tensor
parallelism and sbh/t·(34 + 5as/h) with sequence parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

from megadeep.config.schema import ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelStates:
    """Bytes of one rank's parameters, gradients and optimizer states."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def adam_bytes_per_param(precision: str, stage: int) -> int:
    """K of the ZeRO paper for Adam: fp32 momentum and variance (8), plus 4 for the fp32 master copy
    that mixed precision needs. In fp32 training only stage 0 goes without: Adam updates the
    parameters in place, while DeepSpeed's ZeRO optimizers (stages 1-3) keep an fp32 copy of the
    partition apart from the parameters even when those are fp32 already."""
    return 8 if precision == "fp32" and stage == 0 else 12


def model_states(n_params: float, stage: int, dp: int, precision: str, persistent: float = 0) -> ModelStates:
    """ZeRO's per-rank model states for ``n_params`` parameters held by this rank before ZeRO.
    At stage 3, ``persistent`` parameters (small tensors DeepSpeed keeps gathered) are held whole on
    top of the rank's share of the partitioned flat buffer, which still covers them."""
    p = DTYPE_BYTES[precision]
    return ModelStates(
        params=(n_params / dp + persistent) * p if stage >= 3 else n_params * p,
        grads=n_params * p / (dp if stage >= 2 else 1),
        optimizer=n_params * adam_bytes_per_param(precision, stage) / (dp if stage >= 1 else 1),
    )


def layer_param_numels(m: ModelConfig, tp: int) -> list[int]:
    """Sizes of one decoder layer's parameters on one TP rank: wqkv (q|k|v fused), wo, w13 (gate|up),
    w2 and the two norm weights (replicated, not split). ZeRO-3's persistence threshold applies to
    these tensors as they are, so the fused ones must not be counted as parts."""
    d, q, kv, f = m.dim, m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.hidden_ffn
    return [d * (q + 2 * kv) // tp, q * d // tp, 2 * f * d // tp, f * d // tp, d, d]


def stage_param_numels(m: ModelConfig, tp: int, pp: int) -> list[list[int]]:
    """Parameter sizes held by one TP rank of each pipeline stage (layers split evenly, the remainder
    on the first stages). The first stage holds the embedding; the last the final norm and the LM
    head, which with tied embeddings and pp > 1 is a second copy of the embedding (TiedLayerSpec)."""
    embedding = m.padded_vocab(tp) * m.dim // tp
    base, extra = divmod(m.n_layers, pp)
    stages = [layer_param_numels(m, tp) * (base + (i < extra)) for i in range(pp)]
    stages[0] = [embedding] + stages[0]
    stages[-1] = stages[-1] + [m.dim] + ([] if (m.tie_embeddings and pp == 1) else [embedding])
    return stages


def stage_params(m: ModelConfig, tp: int, pp: int) -> list[int]:
    return [sum(s) for s in stage_param_numels(m, tp, pp)]


def persistent_numel(numels: list[int], threshold: int) -> int:
    """Parameters ZeRO-3 keeps whole on every rank (``stage3_param_persistence_threshold``)."""
    return sum(n for n in numels if n <= threshold)


@dataclass(frozen=True)
class ActivationShape:
    """What one micro-batch of one layer stores for backward depends on."""

    seq: int
    micro_batch: int
    model: ModelConfig
    tp: int = 1
    sequence_parallel: bool = False
    flash: bool = True  # fused attention (SDPA flash/efficient kernels) keeps no s×s matrices
    gated_mlp: bool = True  # SwiGLU (ours); False: GPT's GeLU MLP
    act_bytes: int = 2  # 16-bit activations; 4 for fp32 runs


def layer_activation_bytes(a: ActivationShape, recompute: str = "none") -> float:
    """Bytes one layer keeps for backward for one micro-batch (Korthikanti et al. 2022, §4.1-4.2).

    ``selective`` recomputes the attention core (no s×s terms), which flash attention does anyway;
    ``full`` keeps only the layer input (the rest is rebuilt one layer at a time during backward).
    """
    m, t, B = a.model, a.tp, a.act_bytes
    sbh = a.seq * a.micro_batch * m.dim
    split = t if a.sequence_parallel else 1  # without SP these are replicated on every TP rank
    if recompute == "full":
        return B * sbh / split
    mask = 1 if m.dropout > 0 else 0  # dropout masks, one byte per element
    kv = m.kv_heads / m.n_heads
    # per sublayer (attention, MLP): norm input, matmul input, residual dropout mask
    replicated = 2 * sbh * (2 * B + mask)
    # Q and K for QKᵀ, V, output-projection input; MLP: GeLU in/out, or gate|up, silu(gate), product
    mlp = (4 if a.gated_mlp else 2) * m.hidden_ffn / m.dim
    sharded = sbh * B * ((1 + kv) + kv + 1 + mlp)
    if not (a.flash or recompute == "selective"):
        # softmax output; with attention dropout also its mask and the dropped-out probabilities
        per_score = B + (1 + B if m.attention_dropout > 0 else 0)
        sharded += m.n_heads * a.seq * a.seq * a.micro_batch * per_score
    return replicated / split + sharded / t


def stage_activation_bytes(a: ActivationShape, layers: int, in_flight: int, recompute: str,
                           first: bool, last: bool) -> float:
    """Activations one pipeline stage holds at its peak: ``in_flight`` micro-batches (1F1B keeps up
    to pp - stage of them) of ``layers`` layers, plus the embedding's dropout mask on the first stage
    and the final norm, head input and fp32 logits for the loss on the last (Korthikanti §4.3)."""
    m, t = a.model, a.tp
    sbh = a.seq * a.micro_batch * m.dim
    split = t if a.sequence_parallel else 1
    total = layers * in_flight * layer_activation_bytes(a, recompute)
    if recompute == "full":  # the layer being recomputed holds its full activations meanwhile
        total += layer_activation_bytes(a, "none")
    if first and m.dropout > 0:
        total += in_flight * sbh / split
    if last:
        total += 2 * a.act_bytes * sbh / split + 4 * a.seq * a.micro_batch * m.padded_vocab(t) / t
    return total
