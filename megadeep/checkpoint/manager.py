"""When to save, saving from every rank, and resuming from the newest usable checkpoint.

The trainer calls three things: ``resume()`` once after building the engine, ``after_step(state)``
after every optimizer step, and reads ``last_good`` for error messages. Every rank runs the same
code: DP rank 0 of each (TP rank, PP stage) writes that piece of the model and optimizer, every rank
writes its RNG state, global rank 0 seals the directory. On load every rank reads just the pieces
its own layout needs, so a checkpoint loads into any (TP, PP, DP, ZeRO) layout.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megadeep.checkpoint import rng, store
from megadeep.checkpoint.engine_state import EngineState
from megadeep.checkpoint.store import CheckpointError
from megadeep.checkpoint.tensors import KINDS, ParamSpec, TensorReader, rng_file, tensor_file
from megadeep.config.deepspeed import load_recipe, zero_stage
from megadeep.config.load import to_dict
from megadeep.config.schema import ModelConfig, RunConfig
from megadeep.errors import ConfigError
from megadeep.parallel import groups

log = logging.getLogger("megadeep.checkpoint")

# Model settings a checkpoint's tensors depend on: a run that differs in one of these cannot load it.
ARCHITECTURE = ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "hidden_ffn", "tie_embeddings")


@dataclass
class TrainState:
    step: int
    consumed_samples: int


def check_architecture(saved: ModelConfig, current: ModelConfig, where: Path) -> None:
    for key in ARCHITECTURE:
        a, b = getattr(saved, key), getattr(current, key)
        if a != b:
            raise ConfigError(f"checkpoint {where} has model.{key}={a} but this run has {b}; "
                              "use the checkpoint's model settings or another checkpoint dir")


class CheckpointManager:
    def __init__(self, cfg: RunConfig, engine, params: dict[str, torch.nn.Parameter], device_type: str = "cpu"):
        """``params``: canonical name → this rank's parameter (a pipeline stage passes only its own)."""
        self.cfg, self.engine, self.params = cfg, engine, params
        self.device_type = device_type
        self.root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
        self.state = EngineState(engine)
        self.layout, self.coord, self.rank = groups.layout(), groups.coord(), dist.get_rank()
        self.last_good: Path | None = None
        self._last_save = time.monotonic()

    # --- saving ----------------------------------------------------------------------------------
    def after_step(self, state: TrainState, final: bool = False) -> Path | None:
        """Save if the step count, the clock or the end of training asks for it (all ranks agree).
        (SIGUSR1 is the trainer's: it saves through :meth:`save` and stops.)"""
        if self.root is None:
            return None
        c = self.cfg.checkpoint
        due = final or (c.save_every > 0 and state.step % c.save_every == 0)
        if c.save_minutes > 0:  # each rank's clock: agree on the decision
            flag = torch.tensor([int(due or time.monotonic() - self._last_save >= 60 * c.save_minutes)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            due = bool(flag.item())
        return self.save(state) if due else None

    def _specs(self) -> dict[str, dict]:
        tp, stage, vocab = self.layout.tp, self.coord.pp, self.cfg.model.vocab_size
        return {n: ParamSpec.of(n, p, tp, stage, vocab).to_json() for n, p in self.params.items()}

    def save(self, state: TrainState) -> Path:
        assert self.root is not None
        tmp = self.root / f"{store.TMP_PREFIX}{store.tag(state.step)}"
        if self.rank == 0:
            store.begin(self.root, state.step)
        dist.barrier()
        files: dict[str, dict] = {}
        writer = self.coord.dp == 0
        self.state.ensure_state()
        for kind in KINDS:
            tensors = {}
            for name, p in self.params.items():
                t = self.state.get(p, kind)  # collective over DP under ZeRO
                if writer:
                    tensors[name] = t
            if writer:
                rel = tensor_file(kind, self.coord.tp, self.coord.pp)
                files[rel] = store.write_tensors(tmp, rel, tensors, {"kind": kind})
            del tensors
        files[rng_file(self.rank)] = store.write_pt(tmp, rng_file(self.rank), rng.capture())
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (files, self._specs()))  # our own ranks' dicts, not a file
        final = self.root / store.tag(state.step)
        if self.rank == 0:
            all_files, specs = {}, {}
            for f, s in gathered:
                all_files.update(f)
                for name, spec in s.items():
                    specs.setdefault(name, spec)  # a tied copy on a later stage: keep the first
            all_files[store.META] = store.write_json(tmp, store.META, self._meta(state, specs))
            store.commit(tmp, all_files, state.step)
            c = self.cfg.checkpoint
            store.prune(self.root, c.keep_last, c.keep_every, protect=final)
        dist.barrier()
        self.last_good = final
        self._last_save = time.monotonic()
        if self.rank == 0 and self.cfg.log.progress:
            print(f"megadeep: saved checkpoint {final}", flush=True)
        return final

    def _meta(self, state: TrainState, specs: dict) -> dict:
        p = self.layout
        return {
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "layout": {"tp": p.tp, "pp": p.pp, "dp": p.dp},
            "zero_stage": zero_stage(load_recipe(self.cfg.deepspeed.config)),
            "precision": self.cfg.train.precision,
            "config": to_dict(self.cfg),
            "params": specs,
            "optimizer": self.state.small_state(),
            "rng": True,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    # --- resuming --------------------------------------------------------------------------------
    def resume(self, prefer_dir: bool = False) -> TrainState | None:
        """Load what ``checkpoint.resume`` names: ``auto``, the newest usable checkpoint in
        ``checkpoint.dir``; a ``step_XXXXXXXX`` directory; or another run's checkpoint dir (its newest
        usable one). A damaged checkpoint is reported and the previous one used. ``prefer_dir``: continue
        from ``checkpoint.dir`` whenever it holds a checkpoint (a restarted job)."""
        how = self.cfg.checkpoint.resume
        if prefer_dir and self.root is not None and store.candidates(self.root):
            how = "auto"
        if how == "none":
            return None
        explicit = how != "auto" and store.is_checkpoint(Path(how))  # exactly this one, no fallback
        root = self.root if how == "auto" else Path(how)
        found = [root] if explicit else (store.candidates(root) if root else [])
        problems = []
        for i, path in enumerate(found):
            problem, ckpt, rng_state = None, None, None
            try:
                ckpt = store.Checkpoint.open(path)
                check_architecture(ckpt.model_config, self.cfg.model, path)
                rng_state = self._verify(ckpt)
            except CheckpointError as e:
                problem = str(e)
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, problem)
            bad = [p for p in everyone if p]
            if not bad:
                state = self._load(ckpt, rng_state)
                self.last_good = path
                if self.rank == 0 and self.cfg.log.progress:
                    print(f"megadeep: resumed from {path} at step {state.step}", flush=True)
                return state
            problems.append(bad[0])
            if self.rank == 0:
                nxt = f"; falling back to {found[i + 1]}" if i + 1 < len(found) else ""
                log.warning(f"megadeep: warning: checkpoint {path} is unusable: {bad[0]}{nxt}")
            if explicit:
                raise CheckpointError(f"cannot resume from {path}: {bad[0]}")
        if found:
            raise CheckpointError(f"no usable checkpoint in {root} ({len(found)} tried, newest: {problems[0]}); "
                                  "repair or move them, or set checkpoint.resume=none to start over")
        return None

    def _same_layout(self, ckpt: store.Checkpoint) -> bool:
        return ckpt.meta["layout"] == {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp}

    def _kinds(self, ckpt: store.Checkpoint) -> tuple[str, ...]:
        return KINDS if ckpt.meta.get("optimizer") is not None else KINDS[:1]

    def _verify(self, ckpt: store.Checkpoint) -> dict | None:
        """Check everything this rank will read before anything is applied (a failure must be seen by
        all ranks before any of them changes its state); returns this rank's RNG state, if it applies."""
        reader = TensorReader(ckpt)
        missing = sorted(set(self.params) - set(reader.specs))
        if missing:
            raise CheckpointError(f"{ckpt.path}: has no tensor '{missing[0]}'")
        need: dict[str, set] = {}
        for kind in self._kinds(ckpt):
            for name in self.params:
                for rel in reader.files(kind, name, self.coord.tp, self.layout.tp):
                    need.setdefault(rel, set()).add(name)
        ckpt.verify(sorted(need))
        for rel, names in need.items():
            absent = names - set(ckpt.tensor_keys(rel))
            if absent:
                raise CheckpointError(f"{ckpt.path / rel}: has no tensor '{sorted(absent)[0]}'")
        if ckpt.meta.get("rng") and self._same_layout(ckpt):
            ckpt.verify([rng_file(self.rank)])
            state = ckpt.read_pt(rng_file(self.rank))
            if not isinstance(state, dict) or not {"python", "numpy", "torch", "tracker"} <= set(state):
                raise CheckpointError(f"{ckpt.path / rng_file(self.rank)}: not an RNG state")
            return state
        return None

    @torch.no_grad()
    def _load(self, ckpt: store.Checkpoint, rng_state: dict | None) -> TrainState:
        reader = TensorReader(ckpt)
        tp, tp_rank = self.layout.tp, self.coord.tp
        padded = self.cfg.model.padded_vocab(tp)
        kinds = self._kinds(ckpt)
        if len(kinds) > 1:
            self.state.ensure_state()
        for name, p in self.params.items():
            for kind in kinds:
                self.state.set(p, kind, reader.piece(kind, name, tp_rank, tp, padded).to(p.device))
        small = ckpt.meta.get("optimizer")
        if small is not None:
            self.state.load_small_state(small)
        if rng_state is not None:
            rng.restore(rng_state)
        elif ckpt.step:
            # Another layout: per-rank streams do not map, so draw fresh ones tied to the step.
            from megadeep.parallel.random import seed_everything

            seed_everything(self.cfg.train.seed + ckpt.step, self.device_type)
        return TrainState(ckpt.step, int(ckpt.meta["consumed_samples"]))
