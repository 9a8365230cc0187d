"""Compose the DeepSpeed config dict: a ZeRO recipe from ``ds_configs/`` + a precision fragment +
the run's own numbers.

A recipe says *how* to shard and offload; it never holds batch sizes, lr, clipping or paths. Those
come from :class:`RunConfig` so that there is exactly one place to change them.
"""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

from megadeep.config.load import read_text, unique_json
from megadeep.config.schema import RunConfig
from megadeep.errors import ConfigError

# Keys megadeep owns: a recipe that sets them would silently disagree with the run config.
RUN_OWNED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16",
)
PRECISIONS = ("fp32", "bf16", "fp16")


def recipes_dir() -> Path:
    return Path(str(resources.files("megadeep.ds_configs")))


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.json"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path, "DeepSpeed config"), object_pairs_hook=unique_json)
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON (line {e.lineno}): fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config '{path}' must hold a JSON object")
    return data


def recipe_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise ConfigError(f"deepspeed.config '{name}' does not exist")
        return p
    p = recipes_dir() / f"{name}.json"
    if not p.is_file():
        raise ConfigError(
            f"deepspeed.config '{name}' is not a shipped recipe; choose one of {', '.join(available_recipes())} "
            "or give a path to a JSON file"
        )
    return p


def load_recipe(name: str) -> dict:
    path = recipe_path(name)
    recipe = _read_json(path)
    owned = [k for k in RUN_OWNED_KEYS if k in recipe]
    if owned:
        raise ConfigError(
            f"DeepSpeed config '{path}' sets '{owned[0]}', which megadeep fills from the run config; "
            "remove it from the JSON and set train.*/optim.* instead"
        )
    return recipe


def _zero(recipe: dict) -> dict:
    zero = recipe.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"'zero_optimization' in a DeepSpeed config must be a JSON object, got {zero!r}")
    return zero


def zero_stage(recipe: dict) -> int:
    stage = _zero(recipe).get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool):
        raise ConfigError(f"zero_optimization.stage in a DeepSpeed config must be an integer 0-3, got {stage!r}")
    return stage


def offload_devices(recipe: dict) -> tuple[str, str]:
    """(optimizer, param) offload devices: 'none', 'cpu' or 'nvme'."""
    zero = _zero(recipe)
    for block in ("offload_optimizer", "offload_param"):
        if not isinstance(zero.get(block, {}), dict):
            raise ConfigError(f"zero_optimization.{block} in a DeepSpeed config must be a JSON object")
    return (
        zero.get("offload_optimizer", {}).get("device", "none"),
        zero.get("offload_param", {}).get("device", "none"),
    )


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def precision_fragment(precision: str) -> dict:
    if precision == "fp32":
        return {}
    return _read_json(recipes_dir() / "precision" / f"{precision}.json")


# ZeRO-3 sizes a recipe may write as "auto": a multiple of one decoder layer's parameters on a rank
# (after TP/EP). The gradient reduce bucket, the parameters prefetched and kept gathered, and the
# optimizer's sub-group (DeepSpeed flattens each sub-group's gradient partition into a fresh fp32 copy in
# step, and creates its Adam moments there) then each hold about one layer, so what ZeRO-3 allocates
# beyond the persistent partitions scales with a layer instead of being a fixed 50M-1G elements that can
# exceed a small model's whole partition. (HF transformers' integration sizes its "auto" from dim²,
# about a twelfth of a Llama layer.)
LAYER_SIZED = {"reduce_bucket_size": 1, "stage3_prefetch_bucket_size": 1, "stage3_max_live_parameters": 2,
               "stage3_max_reuse_distance": 1, "sub_group_size": 1}


def layer_sized(zero: dict, layer_numel: int) -> dict:
    """``zero`` (a recipe's zero_optimization block) with its "auto" sizes replaced by layers' numels."""
    return {k: LAYER_SIZED[k] * layer_numel if v == "auto" and k in LAYER_SIZED else v for k, v in zero.items()}


def rank_layer_numel(cfg: RunConfig) -> int:
    """The largest decoder layer's parameters on one rank."""
    from megadeep.model.accounting import layers_param_numels  # (megadeep.model imports the config)

    return max(map(sum, layers_param_numels(cfg.model, cfg.parallel.tp, cfg.parallel.ep)))


def megadeep_clips(cfg: RunConfig, recipe: dict | None = None) -> bool:
    """fp32 without ZeRO: megadeep clips by the global norm itself (see ``training.grad_norm``), since
    DeepSpeed's fp32 clipping miscounts parameters under the pipeline engine."""
    recipe = load_recipe(cfg.deepspeed.config) if recipe is None else recipe
    return cfg.train.precision == "fp32" and zero_stage(recipe) == 0


def compose(cfg: RunConfig, recipe: dict | None = None) -> dict:
    """The dict handed to ``deepspeed.initialize``. ``cfg`` must be resolved (DP and accumulation known);
    ``recipe``: its ZeRO recipe when already read (``training.run.ResolvedRun``)."""
    t, o = cfg.train, cfg.optim
    recipe = load_recipe(cfg.deepspeed.config) if recipe is None else recipe
    ds = _merge(recipe, precision_fragment(t.precision))
    if "zero_optimization" in ds:
        ds["zero_optimization"] = layer_sized(ds["zero_optimization"], rank_layer_numel(cfg))
    # The pipeline engine counts CP ranks as data parallel (its data axis is our DP×CP), though they
    # read the same samples: its batch is CP times ours.
    pipeline_cp = cfg.parallel.cp if cfg.parallel.pp > 1 else 1
    ds.update(
        train_batch_size=t.global_batch_size * pipeline_cp,
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        gradient_clipping=0.0 if megadeep_clips(cfg, recipe) else o.grad_clip,
        steps_per_print=10**9,  # megadeep logs its own metrics
        wall_clock_breakdown=False,
    )
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay},
    }
    if cfg.log.comm_stats:
        ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    if cfg.parallel.cp > 1 and zero_stage(recipe) == 3:
        # ZeRO-3 averages gradients over DP×CP on its reduce-scatter path but sums over CP on its
        # all-reduce path (DeepSpeed 0.19.8), and picks between them per bucket: pin the former
        # (ResolvedRun.cp_grad_scale scales the loss for it).
        ds["zero_optimization"]["reduce_scatter"] = True
    if cfg.parallel.pp > 1:
        # The engine may send 1/TP of each activation between stages and all-gather it on arrival;
        # that presumes activations replicated over TP, which sequence parallel ones are not.
        sp = cfg.parallel.sequence_parallel
        ds["pipeline"] = {**ds.get("pipeline", {}), "pipe_partitioned": not sp, "grad_partitioned": not sp}
    for block in ("offload_optimizer", "offload_param"):
        off = ds.get("zero_optimization", {}).get(block)
        if off and off.get("device") == "nvme":
            off["nvme_path"] = cfg.deepspeed.nvme_path
    return ds
