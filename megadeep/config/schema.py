"""The one typed run configuration: CLI → validation → launcher → every rank's trainer.

Every number a run depends on lives here exactly once. The DeepSpeed JSON under ``ds_configs/``
only holds what is a property of the ZeRO recipe; batch sizes, lr, clipping and paths are filled in
from this object (see ``megadeep.training.ds_config``).
"""
from __future__ import annotations

from dataclasses import dataclass, field


HF_FAMILIES = ("llama", "mistral", "qwen2")  # Hugging Face architectures import/export speaks (checkpoint.hf)
HF_ROPE_LAYOUTS = ("rope_parameters", "rope_scaling")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")  # megadeep.model.rope


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (Hugging Face's ``rope_type`` and its parameters): how a model stretches
    its positions past the context it was pre-trained on. The math is in ``megadeep.model.rope``.
    Frozen: it is part of the key of the cached RoPE tables."""

    type: str = "default"  # default | linear | llama3 | yarn | dynamic
    factor: float = 1.0  # how many times longer than original_max_position_embeddings
    original_max_position_embeddings: int = 0  # llama3, yarn: the pre-training context; 0: model.max_seq_len
    low_freq_factor: float = 1.0  # llama3: wavelengths above original/low_freq_factor are divided by factor
    high_freq_factor: float = 4.0  # llama3: below original/high_freq_factor they are kept; smooth between
    beta_fast: float = 32.0  # yarn: the ramp between extrapolated and interpolated frequencies
    beta_slow: float = 1.0
    attention_factor: float = 0.0  # yarn: scale of cos/sin; 0: from factor (and mscale, mscale_all_dim)
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    truncate: bool = True  # yarn: round the ramp's bounds to whole dimensions


@dataclass
class MoEConfig:
    """Mixture-of-experts FFNs (Mixtral-style SwiGLU experts, softmax router, top-k)."""

    num_experts: int = 0  # 0: dense FFNs everywhere
    top_k: int = 2
    ffn_dim: int | None = None  # each expert's hidden size; None: the model's FFN width
    every: int = 1  # layers i with (i + 1) % every == 0 are MoE (1: all of them)
    shared_experts: int = 0  # always-on SwiGLU experts of ffn_dim each, added to the routed output
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss E·Σ f_e·P_e, averaged over MoE layers
    z_loss_coef: float = 0.0  # router z-loss mean(logsumexp(logits)²)
    capacity_factor: float = 0.0  # 0: dropless; else each expert takes ≤ ceil(cf·tokens·k/E) per micro-batch

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: from the data (256 for data.source=bytes, the tokenizer's size for tokens)
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (plain multi-head attention)
    ffn_dim: int | None = None  # None: 8/3·dim rounded up to ffn_multiple_of (Llama's rule)
    ffn_multiple_of: int = 64
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    sliding_window: int = 0  # an imported model's attention window; only ≥ max_seq_len (never binding) is allowed
    family: str = "llama"  # the Hugging Face architecture exported to: llama | mistral | qwen2
    hf_rope_layout: str = "rope_parameters"  # export's config.json: rope_parameters (transformers ≥ 5) | rope_scaling
    tie_embeddings: bool = True
    init_std: float = 0.02
    residual_scaling: bool = True  # output projections start at init_std/√(2L)
    deepnorm: bool = False  # post-norm with α=(2L)^¼ residual and β=(8L)^-¼ init
    dropout: float = 0.0
    attention_dropout: float = 0.0
    vocab_pad_unit: int = 64  # vocab is padded to a multiple of TP × this
    activation_checkpointing: bool = False
    fused_kernels: str = "auto"  # auto | on | off: megadeep's csrc RMSNorm/SwiGLU
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_ffn(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        m = self.ffn_multiple_of
        return m * ((int(8 * self.dim / 3) + m - 1) // m)

    @property
    def expert_ffn(self) -> int:
        return self.moe.ffn_dim or self.hidden_ffn

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe.enabled and (layer_id + 1) % self.moe.every == 0

    def padded_vocab(self, tp: int) -> int:
        unit = tp * self.vocab_pad_unit
        return unit * ((self.vocab_size + unit - 1) // unit)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 0  # 0: whatever the world size leaves after TP and PP
    sequence_parallel: bool = False
    partition_method: str = "parameters"  # pipeline stage split: parameters | uniform | type:<regex>
    pipeline_checkpoint_interval: int = 0  # activation checkpointing every k layers of a stage
    cp: int = 1  # context parallel: ranks splitting every sequence (zig-zag), between TP and DP in rank order
    cp_attention: str = "auto"  # auto | ulysses (all-to-all over heads) | allgather (all-gather K/V)
    ep: int = 1  # expert parallel: MoE experts sharded over groups of ep consecutive DP ranks


@dataclass
class TrainConfig:
    seed: int = 1234
    steps: int = 100
    seq_len: int = 128
    micro_batch_size: int = 4
    global_batch_size: int = 8
    grad_accum_steps: int = 0  # 0: derived, global / (micro × DP)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 0  # steps between validation passes; 0: only at the end
    eval_iters: int = 4  # global batches in one validation pass
    dist_timeout_s: float = 600.0  # a collective that waits longer than this fails the run
    # no step finished for this long (a stopped rank, a dead node): name the silent ranks and end the job;
    # 0: off. Must exceed the longest step + evaluation + save. Heartbeats go to checkpoint.dir/.heartbeat.
    hang_timeout_s: float = 0.0
    max_consecutive_skips: int = 8  # non-finite steps in a row (each skipped) that stop the run
    loss_spike_factor: float = 3.0  # log a loss above this × its running mean; 0: off
    # torch.compile each transformer block (torchtitan's per-block compile; TP collectives are autograd
    # functions dynamo traces). Off by default: compiling costs tens of seconds per start, paid by every
    # test and short run; turn it on for long runs (bench.train_throughput measures the gain). PP=1, ZeRO ≤ 2.
    compile: bool = False


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 10
    grad_clip: float = 1.0


ADAM_CHOICES = ("auto", "apex_fused", "ds_fused", "ds_cpu_adam", "torch")


@dataclass
class DeepSpeedConfig:
    config: str = "zero1"  # a name under ds_configs/ or a path to a JSON file
    nvme_path: str = ""  # where ZeRO-Infinity swaps to, for configs that offload to NVMe
    optimizer: str = "auto"  # auto | apex_fused | ds_fused | ds_cpu_adam | torch


@dataclass
class DataConfig:
    source: str = "bytes"  # bytes: raw UTF-8 bytes of text files | tokens: preprocessed shards
    format: str = "text"  # text | chat: JSON lines of {"messages": [...]} for SFT (megadeep.finetune.chat; bytes)
    paths: list[str] = field(default_factory=list)  # text files (bytes) or dataset manifests/dirs (tokens)
    weights: list[float] = field(default_factory=list)  # tokens: blend weights, one per path; empty: by size
    corpus: str = ""  # a bundled corpus name (e.g. shakespeare) used when paths is empty
    val_fraction: float = 0.02  # the last part of each dataset, held out for validation
    tokenizer: str = ""  # tokens: a SentencePiece model the data must have been made with (and the corpus is tokenised with)
    tokenizer_vocab: int = 4096  # tokens + corpus, no data.tokenizer: pieces of the tokenizer trained for the corpus
    cache_dir: str = "data_cache"  # tokens + corpus: where the prepared corpus is kept
    verify_checksums: bool = True  # tokens: check every shard's sha256 when a run opens it
    document_mask: bool = False  # packed samples attend only within their documents
    document_positions: bool = False  # with document_mask: RoPE positions restart at 0 in every document
    document_sep: int = -1  # the token ending a document; -1: the tokenizer's eos (tokens), "\n" (bytes)


@dataclass
class LogConfig:
    metrics_file: str = ""  # JSON lines, one per optimizer step (rank 0)
    tensorboard_dir: str = ""
    log_every: int = 1
    progress: bool = True
    comm_stats: bool = False  # bytes per step by axis (TP/DP/PP); adds DeepSpeed's comms logger


@dataclass
class CheckpointConfig:
    dir: str = ""  # where step_XXXXXXXX checkpoints go; empty: no saving
    save_every: int = 0  # steps; 0: only at the end and on SIGUSR1
    save_minutes: float = 0.0  # also save when this much wall time passed since the last save; 0: off
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
    resume: str = "auto"  # auto (newest usable in dir) | none | a checkpoint directory (any layout)


LORA_TARGETS = ("qkv", "o", "gate_up", "down")  # attention q|k|v and output, FFN gate|up and down


@dataclass
class LoraConfig:
    rank: int = 0  # 0: off; else every target layer gets a rank-r adapter and the base is frozen
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # on the adapter's input
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class FinetuneConfig:
    base: str = ""  # a checkpoint (any layout) whose model weights start the run; empty: fresh initialisation
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
