"""Check a run config against a world size before any process starts, and derive what follows.

Each failure is one :class:`ConfigError` line naming the keys involved and a way out.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

from megadeep.config.deepspeed import PRECISIONS, load_recipe, offload_devices, zero_stage
from megadeep.config.schema import ADAM_CHOICES, LORA_TARGETS, RunConfig
from megadeep.errors import ConfigError
from megadeep.pipeline.partition import check_method

BYTE_VOCAB = 256  # data.source=bytes: one token per byte value
NEWLINE = 10  # data.source=bytes: the byte that ends a document under data.document_mask


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str, key: str = "name") -> None:
    """A name that becomes a path component (runs/NAME/…, a SLURM job name): no separators, no ``..``."""
    _require(bool(NAME.fullmatch(name)) and ".." not in name,
             f"{key}='{name}' must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or digit, "
             "no '..'): it becomes a directory name")


def check_finite(cfg) -> None:
    """No inf/NaN anywhere: YAML reads ``.inf``/``nan`` and ``float()`` reads ``inf``, and an infinite
    lr only shows up as a crash at the first save."""
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(part):
            continue
        for f in dataclasses.fields(part):
            v = getattr(part, f.name)
            values = v if isinstance(v, list) else [v]
            for x in values:
                _require(not isinstance(x, float) or math.isfinite(x),
                         f"{section.name}.{f.name} must be a finite number, got {v}")


def _probe_writable(directory: Path) -> str | None:
    """Why files cannot be made in the existing ``directory``, or None (an actual attempt: root
    passes every permission check, a read-only or virtual file system still refuses)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".megadeep-probe-", dir=directory))
    except OSError as e:
        return e.strerror or str(e)
    return None


def _dir_problem(p: Path) -> str | None:
    """Why no files can be written in directory ``p`` (made if missing), or None."""
    if p.exists() and not p.is_dir():
        return "exists and is not a directory"
    ancestor = p
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot be created: '{ancestor}' is a file"
    why = _probe_writable(ancestor)
    return None if why is None else f"is not writable ({why} in '{ancestor}')"


def check_writable_dir(path: str, key: str) -> None:
    """``path`` is a writable directory, or one that can be made (its nearest existing ancestor is)."""
    problem = _dir_problem(Path(path).expanduser().absolute())
    _require(problem is None, f"{key}='{path}' {problem}; choose another directory")


def check_writable_file(path: str, key: str) -> None:
    """``path`` is a file that can be written: not a directory, in a directory that can be made."""
    p = Path(path).expanduser().absolute()
    _require(not p.is_dir(), f"{key}='{path}' is a directory; give a file name")
    problem = _dir_problem(p.parent)
    _require(problem is None, f"{key}='{path}' cannot be written: its directory '{p.parent}' {problem}")


def _check_model(cfg: RunConfig) -> None:
    m, tp = cfg.model, cfg.parallel.tp
    for key in ("dim", "n_layers", "n_heads", "max_seq_len", "vocab_pad_unit", "ffn_multiple_of"):
        _require(getattr(m, key) >= 1, f"model.{key} must be at least 1, got {getattr(m, key)}")
    _require(m.vocab_size >= 0, f"model.vocab_size must be ≥ 0 (0: from the data), got {m.vocab_size}")
    for key in ("n_kv_heads", "ffn_dim"):
        v = getattr(m, key)
        _require(v is None or v >= 1, f"model.{key} must be at least 1 (or null: derived), got {v}")
    for key in ("norm_eps", "rope_theta", "init_std"):
        _require(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    _require(m.dim % m.n_heads == 0, f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    _require(m.head_dim % 2 == 0, f"head dim model.dim/model.n_heads={m.head_dim} must be even for RoPE")
    _require(
        m.n_heads % m.kv_heads == 0,
        f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.kv_heads}; pick kv-heads that divide it",
    )
    _require(
        m.n_heads % tp == 0,
        f"model.n_heads={m.n_heads} is not divisible by parallel.tp={tp}; use a tp that divides the head count",
    )
    _require(
        m.kv_heads % tp == 0,
        f"model.n_kv_heads={m.kv_heads} is not divisible by parallel.tp={tp}; "
        f"use tp ≤ {m.kv_heads} dividing it, or more kv-heads",
    )
    _require(
        m.hidden_ffn % tp == 0,
        f"FFN width {m.hidden_ffn} is not divisible by parallel.tp={tp}; set model.ffn_dim to a multiple of tp",
    )
    _require(0.0 <= m.dropout < 1.0 and 0.0 <= m.attention_dropout < 1.0, "model dropouts must be in [0, 1)")
    _require(m.fused_kernels in ("auto", "on", "off"), f"model.fused_kernels must be auto, on or off, got '{m.fused_kernels}'")
    _require(
        m.fused_kernels != "on" or find_spec("megadeep._C") is not None,
        "model.fused_kernels=on but megadeep's csrc kernels are not built: run "
        "`pip install --no-build-isolation -e .` (scripts/setup.sh does), or set model.fused_kernels=auto",
    )
    _require(
        not (m.deepnorm and m.residual_scaling),
        "model.deepnorm and model.residual_scaling are two different deep-model inits; set one of them to false",
    )
    _check_rope_and_family(m)
    _check_moe_model(cfg)


def _check_rope_and_family(m) -> None:
    from megadeep.config.schema import HF_FAMILIES, HF_ROPE_LAYOUTS, ROPE_TYPES

    r = m.rope_scaling
    _require(r.type in ROPE_TYPES, f"model.rope_scaling.type must be one of {', '.join(ROPE_TYPES)}, got '{r.type}'")
    _require(r.factor >= 1.0, f"model.rope_scaling.factor must be ≥ 1, got {r.factor}")
    _require(r.original_max_position_embeddings >= 0,
             f"model.rope_scaling.original_max_position_embeddings must be ≥ 0 (0: model.max_seq_len), "
             f"got {r.original_max_position_embeddings}")
    _require(r.type != "llama3" or 0 < r.low_freq_factor < r.high_freq_factor,
             "model.rope_scaling: llama3 needs 0 < low_freq_factor < high_freq_factor")
    _require(r.type != "yarn" or (r.beta_fast > 0 and r.beta_slow > 0),
             "model.rope_scaling: yarn needs beta_fast and beta_slow > 0")
    _require(m.family in HF_FAMILIES, f"model.family must be one of {', '.join(HF_FAMILIES)}, got '{m.family}'")
    _require(m.hf_rope_layout in HF_ROPE_LAYOUTS,
             f"model.hf_rope_layout must be one of {', '.join(HF_ROPE_LAYOUTS)}, got '{m.hf_rope_layout}'")
    _require(m.sliding_window == 0 or m.sliding_window >= m.max_seq_len,
             f"model.sliding_window={m.sliding_window} is shorter than model.max_seq_len={m.max_seq_len}: "
             "megadeep's attention has no sliding window; set model.max_seq_len ≤ the window")


def _check_moe_model(cfg: RunConfig) -> None:
    m, moe, tp = cfg.model, cfg.model.moe, cfg.parallel.tp
    _require(moe.num_experts >= 0, f"model.moe.num_experts must be ≥ 0 (0: dense), got {moe.num_experts}")
    if not moe.enabled:
        return
    _require(1 <= moe.top_k <= moe.num_experts,
             f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={moe.num_experts}")
    _require(1 <= moe.every <= m.n_layers,
             f"model.moe.every={moe.every} must be between 1 and model.n_layers={m.n_layers} (else no layer is MoE)")
    _require(moe.ffn_dim is None or moe.ffn_dim >= 1, f"model.moe.ffn_dim must be ≥ 1 (or null), got {moe.ffn_dim}")
    _require(moe.shared_experts >= 0, f"model.moe.shared_experts must be ≥ 0, got {moe.shared_experts}")
    _require(moe.capacity_factor >= 0, f"model.moe.capacity_factor must be ≥ 0 (0: dropless), got {moe.capacity_factor}")
    _require(moe.aux_loss_coef >= 0 and moe.z_loss_coef >= 0, "model.moe.aux_loss_coef and z_loss_coef must be ≥ 0")
    _require(m.expert_ffn % tp == 0,
             f"expert FFN width {m.expert_ffn} is not divisible by parallel.tp={tp}; set model.moe.ffn_dim to a multiple of tp")


def _check_expert_parallel(cfg: RunConfig, dp: int) -> None:
    p, moe = cfg.parallel, cfg.model.moe
    _require(p.ep >= 1, f"parallel.ep must be ≥ 1, got {p.ep}")
    if not moe.enabled:
        _require(p.ep == 1, f"parallel.ep={p.ep} needs an MoE model (model.moe.num_experts > 0)")
        return
    _require(p.cp == 1, f"model.moe with parallel.cp={p.cp} is not supported yet (expert groups do not span CP); "
                        "set parallel.cp=1")
    _require(moe.num_experts % p.ep == 0,
             f"parallel.ep={p.ep} does not divide model.moe.num_experts={moe.num_experts}; use an ep that divides it")
    _require(dp % p.ep == 0, f"parallel.ep={p.ep} does not divide the data-parallel size {dp} (experts are sharded "
                             "over DP ranks); use an ep dividing it, or change the process count")
    _require(not p.sequence_parallel, "model.moe with parallel.sequence_parallel is not supported yet; turn it off")
    _require(zero_stage(load_recipe(cfg.deepspeed.config)) <= 2,
             f"model.moe cannot run with ZeRO stage 3 ('{cfg.deepspeed.config}'): DeepSpeed's MoE supports ZeRO 0-2")


def check_model_alone(cfg: RunConfig) -> None:
    """The model section by itself, before any layout is chosen (``megadeep plan`` picks one)."""
    check_finite(cfg)
    single = copy.deepcopy(cfg)
    single.parallel.tp = 1
    _check_model(single)


def _check_layout(cfg: RunConfig, world_size: int) -> None:
    p = cfg.parallel
    _require(p.tp >= 1 and p.pp >= 1 and p.cp >= 1 and p.dp >= 0,
             "parallel.tp, parallel.cp and parallel.pp must be ≥ 1 and parallel.dp ≥ 0")
    if p.cp == 1:
        _require(
            world_size % (p.tp * p.pp) == 0,
            f"world size {world_size} is not divisible by parallel.tp × parallel.pp = {p.tp}×{p.pp}; "
            f"use a process count that is a multiple of {p.tp * p.pp}",
        )
    else:
        _require(
            world_size % (p.tp * p.cp * p.pp) == 0,
            f"world size {world_size} is not divisible by parallel.tp × cp × pp = {p.tp}×{p.cp}×{p.pp}; "
            f"use a process count that is a multiple of {p.tp * p.cp * p.pp}",
        )
    dp = world_size // (p.tp * p.cp * p.pp)
    axes = "tp × cp × pp" if p.cp > 1 else "tp × pp"
    sizes = "×".join(str(n) for n in ((p.dp, p.tp, p.cp, p.pp) if p.cp > 1 else (p.dp, p.tp, p.pp)))
    _require(
        p.dp in (0, dp),
        f"parallel.dp × {axes} = {sizes} = {p.dp * p.tp * p.cp * p.pp} but the world size is {world_size}; "
        "set parallel.dp=0 to derive it, or change the process count",
    )
    _check_context_parallel(cfg)
    _require(
        p.pp <= cfg.model.n_layers,
        f"parallel.pp={p.pp} is more pipeline stages than model.n_layers={cfg.model.n_layers}",
    )
    _require(p.pipeline_checkpoint_interval >= 0,
             f"parallel.pipeline_checkpoint_interval must be ≥ 0, got {p.pipeline_checkpoint_interval}")
    if p.sequence_parallel:
        _require(
            cfg.train.seq_len % (p.tp * p.cp) == 0,
            f"sequence parallel splits train.seq_len={cfg.train.seq_len} over parallel.tp={p.tp}"
            + (f" (of each of cp={p.cp} slices)" if p.cp > 1 else "") + ": make it divisible",
        )


def _check_context_parallel(cfg: RunConfig) -> None:
    from megadeep.parallel.cp_choice import METHODS

    p, m, seq = cfg.parallel, cfg.model, cfg.train.seq_len
    _require(p.cp_attention in METHODS, f"parallel.cp_attention must be one of {', '.join(METHODS)}, got '{p.cp_attention}'")
    if p.cp == 1:
        return
    _require(seq % (2 * p.cp) == 0,
             f"parallel.cp={p.cp} cuts train.seq_len={seq} into 2·cp={2 * p.cp} zig-zag chunks: "
             f"use a seq_len that is a multiple of {2 * p.cp}")
    kv = m.kv_heads // p.tp if m.kv_heads % p.tp == 0 else m.kv_heads
    _require(p.cp_attention != "ulysses" or kv % p.cp == 0,
             f"parallel.cp_attention=ulysses splits the {kv} KV heads of a TP rank (model.n_kv_heads={m.kv_heads} / "
             f"tp={p.tp}) over parallel.cp={p.cp}, which does not divide them; use cp_attention=allgather or auto")
    _require(m.dropout == 0 and m.attention_dropout == 0,
             f"parallel.cp={p.cp} with model dropout is not supported (CP ranks would draw correlated masks); "
             "set model.dropout=0 and model.attention_dropout=0")


def _check_batch(cfg: RunConfig, dp: int) -> int:
    t = cfg.train
    _require(t.micro_batch_size >= 1, f"train.micro_batch_size must be ≥ 1, got {t.micro_batch_size}")
    _require(t.steps >= 1, f"train.steps must be ≥ 1, got {t.steps}")
    _require(1 <= t.seq_len <= cfg.model.max_seq_len,
             f"train.seq_len={t.seq_len} must be between 1 and model.max_seq_len={cfg.model.max_seq_len}")
    per_step = t.micro_batch_size * dp
    accum = t.grad_accum_steps or (t.global_batch_size // per_step if t.global_batch_size % per_step == 0 else 0)
    _require(
        accum >= 1 and t.global_batch_size == per_step * accum,
        f"train.global_batch_size={t.global_batch_size} must equal micro_batch_size × grad_accum_steps × DP "
        f"= {t.micro_batch_size} × {t.grad_accum_steps or 'k'} × {dp}; use a global batch that is a multiple of {per_step}",
    )
    return accum


def _cuda_available() -> bool:
    """torch.cuda.is_available(), without the seconds of importing torch where no GPU driver
    (NVIDIA or ROCm) is present at all (torch already loaded, e.g. patched in a test: ask it)."""
    drivers = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd")
    if "torch" not in sys.modules and not any(Path(p).exists() for p in drivers):
        return False
    import torch

    return torch.cuda.is_available()


def _check_training(cfg: RunConfig) -> None:
    t, o = cfg.train, cfg.optim
    _require(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got '{t.precision}'")
    _require(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got '{t.device}'")
    if t.device == "cuda":
        _require(_cuda_available(), "train.device=cuda but no CUDA device is visible here "
                                    "(torch.cuda.is_available() is false); use train.device=auto or cpu")
    _require(0 <= t.seed < 2**32, f"train.seed must be in [0, 2^32), got {t.seed}")
    _require(t.dist_timeout_s > 0, f"train.dist_timeout_s must be positive, got {t.dist_timeout_s}")
    _require(t.hang_timeout_s >= 0, f"train.hang_timeout_s must be ≥ 0 (0: off), got {t.hang_timeout_s}")
    _require(not t.hang_timeout_s or bool(cfg.checkpoint.dir),
             "train.hang_timeout_s needs checkpoint.dir (shared by all nodes) for the ranks' heartbeats")
    _require(t.eval_every >= 0, f"train.eval_every must be ≥ 0 (0: only at the end), got {t.eval_every}")
    _require(t.eval_iters >= 1, f"train.eval_iters must be ≥ 1 (a validation pass of no batch has no loss), "
                                f"got {t.eval_iters}")
    _require(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be ≥ 0, got {o.weight_decay}")
    _require(o.lr > 0 and 0 <= o.min_lr <= o.lr, f"need 0 ≤ optim.min_lr ≤ optim.lr and lr > 0 (lr={o.lr}, min_lr={o.min_lr})")
    _require(0 <= o.warmup_steps <= t.steps,
             f"optim.warmup_steps={o.warmup_steps} must be between 0 and train.steps={t.steps}")
    _require(0 < o.beta1 < 1 and 0 < o.beta2 < 1, "optim.beta1 and optim.beta2 must be in (0, 1)")
    _require(o.grad_clip >= 0, f"optim.grad_clip must be ≥ 0 (0 disables clipping), got {o.grad_clip}")


def _check_checkpoint(cfg: RunConfig) -> None:
    c, t = cfg.checkpoint, cfg.train
    _require(c.save_every >= 0 and c.save_minutes >= 0 and c.keep_every >= 0,
             "checkpoint.save_every, checkpoint.save_minutes and checkpoint.keep_every must be ≥ 0")
    _require(c.keep_last >= 1, f"checkpoint.keep_last must be ≥ 1, got {c.keep_last}")
    if c.dir:  # found now, not at the first save after save_every steps of compute
        check_writable_dir(c.dir, "checkpoint.dir")
    if c.resume not in ("auto", "none"):
        p = Path(c.resume)
        _require((p / "manifest.json").is_file() or any(p.glob("step_*/manifest.json")),
                 f"checkpoint.resume='{c.resume}' is neither a checkpoint (step_XXXXXXXX with manifest.json) "
                 "nor a checkpoint dir holding one; give one of those, auto or none")
    _require(t.max_consecutive_skips >= 1, f"train.max_consecutive_skips must be ≥ 1, got {t.max_consecutive_skips}")
    _require(t.loss_spike_factor == 0 or t.loss_spike_factor > 1,
             f"train.loss_spike_factor must be 0 (off) or > 1, got {t.loss_spike_factor}")


def _check_log(cfg: RunConfig) -> None:
    lg = cfg.log
    _require(lg.log_every >= 1, f"log.log_every must be ≥ 1, got {lg.log_every}")
    if lg.metrics_file:
        check_writable_file(lg.metrics_file, "log.metrics_file")
    if lg.tensorboard_dir:
        check_writable_dir(lg.tensorboard_dir, "log.tensorboard_dir")


def _check_deepspeed(cfg: RunConfig) -> None:
    recipe = load_recipe(cfg.deepspeed.config)
    stage = zero_stage(recipe)
    _require(stage in (0, 1, 2, 3), f"zero_optimization.stage in '{cfg.deepspeed.config}' must be 0-3, got {stage}")
    _require(
        cfg.parallel.pp == 1 or stage <= 1,
        f"ZeRO stage {stage} ('{cfg.deepspeed.config}') cannot run with parallel.pp={cfg.parallel.pp}: "
        "DeepSpeed's pipeline engine supports ZeRO 0/1 only; use deepspeed.config=zero1 or pp=1",
    )
    _require(not cfg.train.compile or (cfg.parallel.pp == 1 and stage <= 2),
             f"train.compile=true needs parallel.pp=1 and ZeRO ≤ 2 (got pp={cfg.parallel.pp}, ZeRO {stage}): "
             "the pipeline engine and ZeRO-3's parameter hooks are not compiled; set train.compile=false")
    _require(not (cfg.train.compile and cfg.log.comm_stats),
             "log.comm_stats counts TP traffic in eager mode only: set train.compile=false or log.comm_stats=false")
    opt_dev, param_dev = offload_devices(recipe)
    if "nvme" in (opt_dev, param_dev):
        _require(bool(cfg.deepspeed.nvme_path),
                 f"'{cfg.deepspeed.config}' offloads to NVMe: set deepspeed.nvme_path to a fast local directory")
        check_writable_dir(cfg.deepspeed.nvme_path, "deepspeed.nvme_path")
    adam, name = cfg.deepspeed.optimizer, cfg.deepspeed.config
    _require(adam in ADAM_CHOICES, f"deepspeed.optimizer must be one of {', '.join(ADAM_CHOICES)}, got '{adam}'")
    if opt_dev != "none":
        _require(adam in ("auto", "ds_cpu_adam", "torch"),
                 f"'{name}' offloads the optimizer to {opt_dev}, where it steps on the CPU: "
                 f"deepspeed.optimizer={adam} cannot run there; use auto (DeepSpeedCPUAdam)")
    else:
        _require(adam != "ds_cpu_adam",
                 f"deepspeed.optimizer=ds_cpu_adam needs an optimizer-offload recipe (e.g. zero2_offload), "
                 f"but '{name}' keeps the optimizer on the device")
    _require(not (adam in ("apex_fused", "ds_fused") and cfg.train.device == "cpu"),
             f"deepspeed.optimizer={adam} is a CUDA kernel but train.device=cpu; use deepspeed.optimizer=auto")


def check_data(cfg: RunConfig, files: bool = True) -> None:
    """The data settings and (``files``) that the named files exist; what the token datasets hold
    (and their tokenizer's vocab) is checked by megadeep.data.prepare."""
    d, vocab = cfg.data, cfg.model.vocab_size
    _require(d.source in ("bytes", "tokens"), f"data.source must be bytes or tokens, got '{d.source}'")
    _require(d.format in ("text", "chat"), f"data.format must be text or chat, got '{d.format}'")
    _require(d.format == "text" or (bool(d.paths) and (d.source == "tokens") == bool(d.tokenizer)),
             "data.format=chat reads JSON-lines files in data.paths, as bytes (data.source=bytes) or with "
             "data.tokenizer (data.source=tokens)")
    _require(bool(d.paths or d.corpus),
             "no training data: set data.paths or data.corpus (e.g. data.corpus=shakespeare)")
    _require(0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    _require(d.document_sep >= -1, f"data.document_sep must be a token id, or -1 (the eos), got {d.document_sep}")
    _require(d.document_mask or not d.document_positions,
             "data.document_positions restarts RoPE per document of data.document_mask: set data.document_mask=true")
    _require(not d.document_mask or cfg.parallel.pp == 1,
             f"data.document_mask with parallel.pp={cfg.parallel.pp} is not supported (the document structure "
             "does not travel between pipeline stages); use pp=1")
    if d.tokenizer and files:
        _require(Path(d.tokenizer).exists(), f"data.tokenizer='{d.tokenizer}' does not exist (give a tokenizer "
                                             "directory or its tokenizer.model)")
    if d.source == "bytes":
        for path in d.paths if files else ():
            _require(Path(path).is_file(), f"data.paths: '{path}' is not a file (data.source=bytes reads text files)")
        _require(vocab == 0 or vocab >= BYTE_VOCAB,
                 f"model.vocab_size={vocab} is too small for data.source=bytes; set 0 (256 byte values) or ≥ 256")
        _require(not d.weights, "data.weights blends token datasets; with data.source=bytes leave it empty")
        return
    _require(vocab >= 0, f"model.vocab_size must be ≥ 0 (0: from the tokenizer), got {vocab}")
    for path in d.paths if files else ():
        _require(Path(path).exists(), f"data.paths: '{path}' does not exist (give a prepared dataset's "
                                      "directory or manifest)")
    if d.corpus and not d.paths and files:
        check_writable_dir(d.cache_dir, "data.cache_dir")
    _require(not d.weights or (len(d.weights) == len(d.paths) and min(d.weights) > 0),
             f"data.weights needs one positive weight per data.paths entry ({len(d.paths)}), got {d.weights}")
    _require(d.tokenizer_vocab >= 320,
             f"data.tokenizer_vocab={d.tokenizer_vocab} is too small: the tokenizer needs 256 byte pieces, "
             "specials and the alphabet; use ≥ 320")


def _check_finetune(cfg: RunConfig) -> None:
    f, lora = cfg.finetune, cfg.finetune.lora
    _require(not f.base or Path(f.base).is_dir(), f"finetune.base '{f.base}' is not a directory (give a checkpoint)")
    _require(not f.base or cfg.parallel.pp == 1, "finetune.base loads into parallel.pp=1 runs (a pipeline run can "
                                                 "start from a checkpoint with checkpoint.resume=<step dir>)")
    _require(lora.rank >= 0, f"finetune.lora.rank must be ≥ 0, got {lora.rank}")
    if not lora.rank:
        return
    _require(lora.alpha > 0, f"finetune.lora.alpha must be > 0, got {lora.alpha}")
    _require(0 <= lora.dropout < 1, f"finetune.lora.dropout must be in [0, 1), got {lora.dropout}")
    bad = [t for t in lora.targets if t not in LORA_TARGETS]
    _require(bool(lora.targets) and not bad and len(set(lora.targets)) == len(lora.targets),
             f"finetune.lora.targets must be distinct names among {', '.join(LORA_TARGETS)}, got {lora.targets}")
    _require(cfg.parallel.pp == 1, "finetune.lora needs parallel.pp=1 (adapters are not placed on pipeline stages)")
    _require(not cfg.parallel.sequence_parallel, "finetune.lora needs parallel.sequence_parallel=false")


def resolve(cfg: RunConfig, world_size: int, require_data: bool = True) -> RunConfig:
    """Validate ``cfg`` for ``world_size`` processes and return a copy with DP and accumulation filled in.
    ``require_data=False`` (the planner, a dry run: layouts, not a run) lets a config name no data, or
    data that is not on this machine."""
    _require(world_size >= 1, f"world size must be ≥ 1, got {world_size}")
    check_name(cfg.name)
    check_finite(cfg)
    _check_layout(cfg, world_size)
    _check_model(cfg)
    check_method(cfg.model, cfg.parallel.partition_method)  # its stage bounds always hold a block each
    _check_training(cfg)
    _check_deepspeed(cfg)
    if require_data or cfg.data.paths or cfg.data.corpus:
        check_data(cfg, files=require_data)
    _check_checkpoint(cfg)
    _check_log(cfg)
    _check_finetune(cfg)
    out = copy.deepcopy(cfg)
    if cfg.data.source == "bytes" and not cfg.model.vocab_size:
        out.model.vocab_size = BYTE_VOCAB
    if cfg.data.source == "bytes" and cfg.data.document_sep < 0:
        out.data.document_sep = NEWLINE  # bytes have no eos: a line is a document
    out.parallel.dp = world_size // (cfg.parallel.tp * cfg.parallel.cp * cfg.parallel.pp)
    _check_expert_parallel(cfg, out.parallel.dp)
    out.train.grad_accum_steps = _check_batch(cfg, out.parallel.dp)
    return out
