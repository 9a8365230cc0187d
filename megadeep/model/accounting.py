"""One accounting of the decoder's parameters, FLOPs and activation bytes, for any layout.

The model's ``num_params``, the trainer's MFU (monitoring/flops.py), ``megadeep memory``, the dry run
and the planner all count from here, so the MFU a run logs and the MFU ``megadeep plan`` predicts are
the same formula, and per-rank parameter counts are the tensors the built model holds.

Parameters per rank follow the model code (megadeep/model/llama.py): fused ``wqkv`` and ``w13``
split over TP, norms replicated, the embedding (and an untied head) over the vocabulary padded to a
multiple of TP × ``vocab_pad_unit``. Which layers each pipeline stage holds, and
so the per-rank counts of a stage, is megadeep.pipeline.partition's (from the per-spec counts here).

FLOPs: model FLOPs per token are PaLM's / Narayanan et al. 2021's (eq. 3) 6·N + 12·L·h·s, where N
counts the parameters that take part in a matmul (every decoder weight and the LM head; an untied
input embedding is a lookup and is left out; norm weights are counted, a negligible overcount the
formula traditionally makes) and 12·L·h·s are attention's score and value products (no causal
discount). Hardware FLOPs add one more forward of the layers under full recomputation.

Activations generalise Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", §4) from GPT's block to ours (GQA, gated MLP, optional dropout): for GPT
shapes it is exactly their sbh(34 + 5as/h) per layer, sbh(10 + 24/t + 5as/(ht)) under tensor
parallelism and sbh/t·(34 + 5as/h) with sequence parallelism. Context parallelism divides s by cp
everywhere a rank holds its own tokens; the attention core's scores are (s/cp)×s, and the all-gather-KV
variant also keeps the gathered keys and values (s, not s/cp, rows).
"""
from __future__ import annotations

from dataclasses import dataclass

from megadeep.config.schema import ModelConfig


# --- parameters -----------------------------------------------------------------------------------

def layer_param_numels(m: ModelConfig, tp: int = 1, layer_id: int = 0, ep: int = 1) -> list[int]:
    """Sizes of one decoder layer's parameters on one TP rank: wqkv (q|k|v fused), wo, the FFN and the
    two norm weights (replicated, not split). A dense FFN is w13 (gate|up) and w2; an MoE one
    (``layer_id`` decides, megadeep/model/moe.py) the router (replicated), this EP rank's E/EP experts'
    w13 and w2 stacked, and the shared experts' w13 and w2. ZeRO-3's persistence threshold applies to
    these tensors as they are, so the fused ones must not be counted as parts. wqkv's bias (if the model
    has one) comes last."""
    d, q, kv, f = m.dim, m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.hidden_ffn
    bias = [(q + 2 * kv) // tp] if m.qkv_bias else []
    attention, rest = [d * (q + 2 * kv) // tp, q * d // tp], [d, d, *bias]  # rest: norms, bias
    if not m.is_moe_layer(layer_id):
        return [*attention, 2 * f * d // tp, f * d // tp, *rest]
    e, fe, shared = m.moe.num_experts, m.expert_ffn, m.moe.shared_experts * m.expert_ffn
    ffn = [e * d, e // ep * 2 * fe * d // tp, e // ep * fe * d // tp]
    if shared:
        ffn += [2 * shared * d // tp, shared * d // tp]
    return [*attention, *ffn, *rest]


def layers_param_numels(m: ModelConfig, tp: int = 1, ep: int = 1) -> list[list[int]]:
    """``layer_param_numels`` of every layer, in order."""
    return [layer_param_numels(m, tp, i, ep) for i in range(m.n_layers)]


def expert_param_numel(m: ModelConfig, tp: int = 1, ep: int = 1, layers=None) -> int:
    """Routed-expert parameters one TP × EP rank holds in ``layers`` (default: all) — ZeRO partitions
    them over DP/EP ranks, not DP."""
    n_moe = sum(m.is_moe_layer(i) for i in (range(m.n_layers) if layers is None else layers))
    return n_moe * m.moe.num_experts // ep * 3 * m.expert_ffn * m.dim // tp if m.moe.enabled else 0


def inactive_expert_params(m: ModelConfig) -> int:
    """Parameters of the routed experts a token does not use: (E - top_k) experts in each MoE layer."""
    return expert_param_numel(m) // m.moe.num_experts * (m.moe.num_experts - m.moe.top_k) if m.moe.enabled else 0


def embedding_numel(m: ModelConfig, tp: int = 1) -> int:
    """One TP rank's rows of the (padded) embedding table, or of an untied LM head."""
    return m.padded_vocab(tp) * m.dim // tp


def num_params(m: ModelConfig) -> int:
    """Parameters of the full (TP=1) model, unpadded vocabulary, the tied head counted once."""
    table = m.vocab_size * m.dim
    return table * (1 if m.tie_embeddings else 2) + sum(map(sum, layers_param_numels(m))) + m.dim


def active_params(m: ModelConfig) -> int:
    """Parameters one token's forward uses: all of a dense model; an MoE model's top_k routed experts
    per MoE layer, not all E (the router and shared experts count)."""
    return num_params(m) - inactive_expert_params(m)


def matmul_params(m: ModelConfig) -> int:
    """N of the model-FLOPs formula: every active parameter but an untied input embedding (a lookup)."""
    n = active_params(m)
    return n if m.tie_embeddings else n - m.vocab_size * m.dim


def flops_per_token(m: ModelConfig, seq: int) -> float:
    """Model FLOPs per trained token (forward and backward): 6·N_active + 12·L·h·s."""
    return 6.0 * matmul_params(m) + 12.0 * m.n_layers * m.dim * seq


def recompute_flops_per_token(m: ModelConfig, seq: int, recompute: str) -> float:
    """FLOPs per token that full activation recomputation adds: one more forward of every layer."""
    if recompute != "full":
        return 0.0
    layers = sum(map(sum, layers_param_numels(m))) - inactive_expert_params(m)
    return 2.0 * layers + m.n_layers * 4.0 * m.dim * seq


def spec_param_numels(m: ModelConfig, tp: int, ep: int = 1) -> list[int]:
    """Per-TP-rank parameters of each pipeline layer spec in order (pipeline/stages.py): embedding,
    blocks, final norm, head (the tied head counted as DeepSpeed counts it: the embedding's size)."""
    return [embedding_numel(m, tp), *map(sum, layers_param_numels(m, tp, ep)), m.dim, embedding_numel(m, tp)]


# --- the matmuls a rank runs ------------------------------------------------------------------------

@dataclass(frozen=True)
class Gemm:
    """``rows × inner`` @ ``inner × cols``, ``count`` times: 2·rows·inner·cols FLOPs each."""

    name: str
    rows: int
    inner: int
    cols: int
    count: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.inner * self.cols * self.count


def layer_gemms(m: ModelConfig, tokens: int, tp: int) -> list[Gemm]:
    """The weight matmuls of one layer's forward on one TP rank for ``tokens`` tokens (sequence
    parallel gathers the sequence before them, so every rank multiplies all tokens)."""
    d, q, kv, f = m.dim, m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.hidden_ffn
    return [Gemm("wqkv", tokens, d, (q + 2 * kv) // tp), Gemm("wo", tokens, q // tp, d),
            Gemm("w13", tokens, d, 2 * f // tp), Gemm("w2", tokens, f // tp, d)]


def head_gemm(m: ModelConfig, tokens: int, tp: int) -> Gemm:
    return Gemm("head", tokens, m.dim, m.padded_vocab(tp) // tp)


def backward_gemms(g: Gemm) -> list[Gemm]:
    """A forward matmul's two backward ones: the input gradient and the weight gradient."""
    return [Gemm(g.name + ".dgrad", g.rows, g.cols, g.inner, g.count),
            Gemm(g.name + ".wgrad", g.inner, g.rows, g.cols, g.count)]


def attention_flops(m: ModelConfig, seq: int, micro_batch: int, tp: int) -> float:
    """Forward FLOPs of QKᵀ and AV on one TP rank (no causal discount, as the FLOP formula counts)."""
    return 4.0 * micro_batch * seq * seq * m.n_heads * m.head_dim / tp


def elementwise_bytes(m: ModelConfig, tokens: int, tp: int, sequence_parallel: bool, act_bytes: int) -> float:
    """Bytes one layer's forward moves outside its matmuls and attention core (memory-bound kernels):
    two RMSNorms (read, write), two residual adds (two reads, a write), RoPE on q and k, the q/k/v
    head transposes, SwiGLU (gate and up in, product out), dropout masks when training with dropout.
    Norms and residuals run on 1/TP of the tokens under sequence parallelism, else on all of them."""
    d, q, kv, f = m.dim, m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.hidden_ffn
    split = tp if sequence_parallel else 1
    replicated = (2 * 2 + 2 * 3 + (4 if m.dropout > 0 else 0)) * d
    sharded = 2 * (q + kv) + 2 * (q + 2 * kv) + 3 * f
    return tokens * act_bytes * (replicated / split + sharded / tp)


# --- activations ------------------------------------------------------------------------------------

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
    cp: int = 1  # context parallel: this rank holds seq/cp of every sequence
    cp_gathers_kv: bool = False  # CP attention = allgather (keeps whole-sequence K and V); False: Ulysses


def layer_activation_bytes(a: ActivationShape, recompute: str = "none") -> float:
    """Bytes one layer keeps for backward for one micro-batch (Korthikanti et al. 2022, §4.1-4.2).

    ``selective`` recomputes the attention core (no s×s terms), which flash attention does anyway;
    ``full`` keeps only the layer input (the rest is rebuilt one layer at a time during backward).
    """
    m, t, B = a.model, a.tp, a.act_bytes
    sbh = a.seq * a.micro_batch * m.dim // a.cp  # this rank's tokens
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
    if a.cp > 1 and a.cp_gathers_kv:
        sharded += sbh * B * 2 * kv * (a.cp - 1)  # the other ranks' keys and values
    if not (a.flash or recompute == "selective"):
        # softmax output; with attention dropout also its mask and the dropped-out probabilities
        per_score = B + (1 + B if m.attention_dropout > 0 else 0)
        sharded += m.n_heads * a.seq * a.seq // a.cp * a.micro_batch * per_score
    return replicated / split + sharded / t


def stage_activation_bytes(a: ActivationShape, layers: int, in_flight: int, recompute: str,
                           first: bool, last: bool) -> float:
    """Activations one pipeline stage holds at its peak: ``in_flight`` micro-batches (1F1B keeps up
    to pp - stage of them) of ``layers`` layers, plus the embedding's dropout mask on the first stage
    and the final norm, head input and fp32 logits for the loss on the last (Korthikanti §4.3)."""
    m, t = a.model, a.tp
    sbh = a.seq * a.micro_batch * m.dim // a.cp
    split = t if a.sequence_parallel else 1
    total = layers * in_flight * layer_activation_bytes(a, recompute)
    if recompute == "full":  # the layer being recomputed holds its full activations meanwhile
        total += layer_activation_bytes(a, "none")
    if first and m.dropout > 0:
        total += in_flight * sbh / split
    if last:
        total += 2 * a.act_bytes * sbh / split + 4 * a.seq // a.cp * a.micro_batch * m.padded_vocab(t) / t
    return total


def cp_attention_bytes(m: ModelConfig, seq: int, micro_batch: int, tp: int, cp: int, method: str,
                       act_bytes: int) -> float:
    """Bytes one rank receives from the other CP ranks in one layer's attention forward (backward moves
    the same again). Ulysses: four all-to-alls (q, k, v in, the output back), each bringing (cp-1)/cp of
    a [seq/cp, heads/tp] tensor; allgather: the other ranks' keys and values."""
    if cp == 1:
        return 0.0
    local = seq // cp * micro_batch * m.head_dim * act_bytes  # one head's worth of this rank's tokens
    q, kv = m.n_heads // tp, m.kv_heads // tp
    if method == "ulysses":
        return local * (2 * q + 2 * kv) * (cp - 1) / cp
    return local * 2 * kv * (cp - 1)
