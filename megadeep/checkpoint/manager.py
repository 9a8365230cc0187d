"""When to save, saving from every rank, and resuming from the newest usable checkpoint.

The trainer calls three things: ``resume()`` once after building the engine, ``after_step(state)``
after every optimizer step, and reads ``last_good`` for error messages. Periodic saves are
asynchronous: training pauses for a snapshot to host memory, a thread writes, hashes and fsyncs, and
the checkpoint is committed (and ``latest`` moved) at a later step boundary once every rank's writer
is done; explicit saves (SIGUSR1, the end of training) first finish the one in flight. Every rank runs the same
code: DP rank 0 of each (TP rank, PP stage) writes that piece of the model and optimizer, every rank
writes its RNG state, global rank 0 seals the directory. On load every rank reads just the pieces
its own layout needs, so a checkpoint loads into any (TP, PP, DP, ZeRO) layout.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megadeep.checkpoint import rng, store
from megadeep.checkpoint.engine_state import EngineState
from megadeep.checkpoint.store import CheckpointError
from megadeep.checkpoint.tensors import KINDS, ParamSpec, TensorReader, rng_file, tensor_file
from megadeep.config.load import to_dict
from megadeep.config.schema import ModelConfig, RunConfig
from megadeep.errors import ConfigError
from megadeep.parallel import groups
from megadeep.parallel.experts import gather_experts, is_expert, local_experts

log = logging.getLogger("megadeep.checkpoint")

# Model settings a checkpoint's tensors depend on: a run that differs in one of these cannot load it.
ARCHITECTURE = ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "hidden_ffn", "tie_embeddings", "qkv_bias")


@dataclass
class TrainState:
    step: int
    consumed_samples: int


class PendingSave:
    """One rank's part of a save after the snapshot: serialise, write, hash and fsync its files, in a
    thread or inline. Touches only host memory and files (no collectives, no engine state)."""

    def __init__(self, tmp: Path, step: int, snapshot: dict, rng_rel: str, rng_state: dict, meta: dict | None):
        self.tmp, self.step, self.meta = tmp, step, meta
        self._snapshot, self._rng = snapshot, (rng_rel, rng_state)
        self.files: dict[str, dict] = {}
        self.error: str | None = None
        self.elapsed = 0.0
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        start = time.perf_counter()
        try:
            for rel, (kind, tensors) in self._snapshot.items():
                self.files[rel] = store.write_tensors(self.tmp, rel, tensors, {"kind": kind})
            rel, state = self._rng
            self.files[rel] = store.write_pt(self.tmp, rel, state)
        except Exception as e:  # reported to every rank by finish(); the previous checkpoint stays latest
            self.error = f"{type(e).__name__}: {e}"
        self._snapshot = {}  # free the host copies
        self.elapsed = time.perf_counter() - start

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"megadeep-save-{self.step}", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def join(self) -> tuple[dict, str | None]:
        if self._thread is not None:
            self._thread.join()
        return self.files, self.error


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
        self._pending: PendingSave | None = None
        self._host: dict[tuple[str, str], torch.Tensor] = {}  # pinned snapshot buffers, reused
        self.timings: dict[str, float] = {}  # the last save's snapshot_s (training paused) and write_s

    # --- saving ----------------------------------------------------------------------------------
    def after_step(self, state: TrainState, final: bool = False) -> Path | None:
        """Finish an in-flight save whose files are all written; start a new one (in the background)
        if the step count or the clock asks for it, or save synchronously at the end of training
        (all ranks agree). (SIGUSR1 is the trainer's: it saves through :meth:`save` and stops.)"""
        if self.root is None:
            return None
        self.poll()
        c = self.cfg.checkpoint
        due = final or (c.save_every > 0 and state.step % c.save_every == 0)
        if c.save_minutes > 0:  # each rank's clock: agree on the decision
            flag = torch.tensor([int(due or time.monotonic() - self._last_save >= 60 * c.save_minutes)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            due = bool(flag.item())
        return self.save(state, background=not final) if due else None

    def _specs(self) -> dict[str, dict]:
        tp, stage, vocab = self.layout.tp, self.coord.pp, self.cfg.model.vocab_size
        specs = {n: ParamSpec.of(n, p, tp, stage, vocab) for n, p in self.params.items()}
        for n, p in self.params.items():
            if is_expert(p):  # files hold all experts (gathered over EP), so any EP size can read them
                specs[n].shape[0] *= self.layout.ep
        return {n: s.to_json() for n, s in specs.items()}

    def save(self, state: TrainState, background: bool = False) -> Path:
        """Checkpoint ``state``. Training pauses only for the snapshot to host memory (the collectives
        that gather ZeRO fragments, a device→pinned-host copy on GPU); serialising, hashing and fsync
        run in a thread. At most one save is in flight: a new one first finishes the previous. The
        checkpoint becomes visible (renamed into place, ``latest``) only in :meth:`finish`, after every
        rank's files are written and fsynced, so a crash meanwhile leaves the previous one as latest.
        ``background=False`` returns with the checkpoint committed."""
        assert self.root is not None
        self.wait()
        started = time.perf_counter()
        self._last_save = time.monotonic()  # the clock counts from the state's step, not from its commit
        tmp = self.root / f"{store.TMP_PREFIX}{store.tag(state.step)}"
        if self.rank == 0:
            store.begin(self.root, state.step)
        dist.barrier()
        writer = self.coord.dp == 0 and groups.get_context_parallel_rank() == 0  # CP ranks hold the same weights
        self.state.ensure_state()
        snapshot: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}  # file → (kind, tensors)
        for kind in KINDS:
            tensors = {}
            for name, p in self.params.items():
                local = None if is_expert(p) else self.state.local(p, kind)  # the same on every rank of p's DP group
                if local is not None:
                    if writer:  # a synchronous save writes straight from the optimizer's memory
                        tensors[name] = self._to_host(kind, name, local) if background else local
                    continue
                t = self.state.get(p, kind)  # collective over DP under ZeRO; a copy, never a view
                if is_expert(p):
                    t = gather_experts(t)  # collective over EP
                if writer:
                    tensors[name] = t if t.device.type == "cpu" else self._to_host(kind, name, t)
            if writer:
                snapshot[tensor_file(kind, self.coord.tp, self.coord.pp)] = (kind, tensors)
        if self.device_type == "cuda":
            torch.cuda.synchronize()  # the non-blocking copies into pinned memory have landed
        rng_state = rng.capture()
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._specs())
        meta = None
        if self.rank == 0:
            specs: dict = {}
            for s in gathered:
                for name, spec in s.items():
                    specs.setdefault(name, spec)  # a tied copy on a later stage: keep the first
            meta = copy.deepcopy(self._meta(state, specs))  # as of this step, whatever runs meanwhile
        self.timings = {"snapshot_s": time.perf_counter() - started}
        self._pending = PendingSave(tmp, state.step, snapshot, rng_file(self.rank), rng_state, meta)
        if background:
            self._pending.start()
        else:
            self._pending.run()
        final = self.root / store.tag(state.step)
        if not background:
            self.wait()
        return final

    def _to_host(self, kind: str, name: str, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` in a reused host buffer the background writer can own (the previous save has
        finished, so it is free); pinned on GPU. Reused on CPU too: fresh pages cost more than the copy."""
        buf = self._host.get((kind, name))
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._host[(kind, name)] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
        return buf.copy_(t, non_blocking=True)

    def in_flight(self) -> bool:
        return self._pending is not None

    def poll(self) -> None:
        """Finish the in-flight save if every rank's writer is done (one small collective per step
        while a save is in flight; ranks decide together, so all enter :meth:`finish`)."""
        if self._pending is None:
            return
        done = torch.tensor([int(self._pending.done())])
        if dist.get_world_size() > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item():
            self.finish()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is committed."""
        if self._pending is not None:
            self.finish()

    def finish(self) -> Path:
        """Collective: join this rank's writer, gather every rank's file records, and on rank 0 write
        meta.json, seal the directory with its manifest, move ``latest`` and prune."""
        pending, self._pending = self._pending, None
        assert pending is not None
        files, error = pending.join()
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (files, error))
        errors = [e for _, e in gathered if e]
        if errors:
            raise CheckpointError(f"saving checkpoint step {pending.step} failed: {errors[0]}")
        final = self.root / store.tag(pending.step)
        if self.rank == 0:
            all_files = {}
            for f, _ in gathered:
                all_files.update(f)
            all_files[store.META] = store.write_json(pending.tmp, store.META, pending.meta)
            store.commit(pending.tmp, all_files, pending.step)
            c = self.cfg.checkpoint
            store.prune(self.root, c.keep_last, c.keep_every, protect=final)
        dist.barrier()
        self.last_good = final
        self.timings["write_s"] = pending.elapsed
        if self.rank == 0 and self.cfg.log.progress:
            print(f"megadeep: saved checkpoint {final}", flush=True)
        return final

    def _meta(self, state: TrainState, specs: dict) -> dict:
        return {
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "layout": self._layout_meta(),
            "zero_stage": self.engine.zero_optimization_stage(),  # the engine's own, not the recipe re-read
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
                    if not self._same_layout(ckpt):
                        was, t = ckpt.meta["layout"], self.cfg.train
                        print(f"megadeep: the checkpoint was written by TP={was['tp']} DP={was['dp']} PP={was['pp']}; "
                              f"resharded to TP={self.layout.tp} DP={self.layout.dp} PP={self.layout.pp}, global batch "
                              f"{t.global_batch_size} kept with {t.grad_accum_steps} accumulation step(s)", flush=True)
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

    def _layout_meta(self) -> dict:
        p = self.layout
        return {"tp": p.tp, "pp": p.pp, "dp": p.dp, **({"cp": p.cp} if p.cp > 1 else {}),
                **({"ep": p.ep} if p.ep > 1 else {})}

    def _same_layout(self, ckpt: store.Checkpoint) -> bool:
        return ckpt.meta["layout"] == self._layout_meta()

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
                piece = reader.piece(kind, name, tp_rank, tp, padded)
                self.state.set(p, kind, (local_experts(piece) if is_expert(p) else piece).to(p.device))
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
