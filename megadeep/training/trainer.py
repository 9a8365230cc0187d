"""The training loop: our model and data, DeepSpeed's engine for ZeRO, mixed precision, the optimizer
and the LR schedule.

Everything the loop needs comes from one resolved :class:`RunConfig`; ``train`` may be called more
than once in a process (tests run several layouts in one launch).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from megadeep.checkpoint.manager import CheckpointManager, TrainState
from megadeep.config.schema import RunConfig
from megadeep.data.loader import Loader, build_split
from megadeep.errors import RunAborted
from megadeep.finetune.build import build_finetune_model, finetuning
from megadeep.launch.env import bind_device, discover, init_distributed, quiet_libraries
from megadeep.launch.placement import report_actual
from megadeep import ops
from megadeep.model import num_params
from megadeep.model.accounting import active_params
from megadeep.model.moe import set_loss_scale, stats_record, take_stats
from megadeep.monitoring.comm import CommMeter
from megadeep.monitoring.flops import peak_flops
from megadeep.monitoring.metrics_log import MetricsLog, memory_mb
from megadeep.parallel import groups
from megadeep.parallel.random import seed_everything
from megadeep.training import preemption
from megadeep.training.build import build_model
from megadeep.training.ds_fixes import share_zero3_fp32_master
from megadeep.training.grad_norm import ClipByGlobalNorm
from megadeep.training.guard import FaultGuard
from megadeep.training.host_memory import release_freed_memory, reuse_freed_memory, tune_cpu_allocator
from megadeep.training.optimizer import choose_adam, lr_scheduler, param_groups
from megadeep.training.run import resolve_run


def skip_identity_allreduce(engine, dp: int) -> bool:
    """At DP=1 without ZeRO, DeepSpeed's gradient all-reduce flattens every gradient, all-reduces
    over one rank and copies back: ~5% of a step for nothing. Turn it off there (the pipeline engine
    has its own flag; its tied-weight reduction is separate and stays). Only for a bare optimizer:
    ZeRO 1/2/3 and DeepSpeed's fp16/bf16 wrappers also move gradients into their own buffers there."""
    wrapped = hasattr(engine.optimizer, "set_gradient_accumulation_boundary")  # DeepSpeed's optimizer base
    if dp != 1 or engine.zero_optimization_stage() != 0 or wrapped or engine.has_moe_layers:
        return False
    engine.enable_backward_allreduce = False
    if hasattr(engine, "pipeline_enable_backward_allreduce"):
        engine.pipeline_enable_backward_allreduce = False
    return True


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    elapsed_s: float
    skipped: bool = False  # non-finite loss or gradient: no update was applied
    loss_spike: bool = False
    moe: dict | None = None  # MoE router metrics (aux/z loss, per-expert load, dropped fraction), DP mean


@dataclass
class Summary:
    history: list[StepResult] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # what was logged per step (rank 0's view)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    preempted: bool = False  # stopped early on a stop signal (after saving a checkpoint when there is a dir)
    stop_signal: int = 0  # which: SIGUSR1 asks for a requeue, SIGTERM (SLURM's cancel/requeue) does not

    @property
    def exit_code(self) -> int:
        """What the process exits with: 0 when done, REQUEUE_EXIT after a USR1 save, 128+N on signal N."""
        from megadeep.launch.slurm import REQUEUE_EXIT

        if not self.preempted:
            return 0
        return REQUEUE_EXIT if self.stop_signal == signal.SIGUSR1 else 128 + self.stop_signal


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.stop = preemption.install()
        pe = discover()
        self.device = bind_device(pe, cfg.train.device)  # first: before any CUDA tensor, RNG or DeepSpeed call
        quiet_libraries(self.device, pe.rank)  # before DeepSpeed's first import
        import deepspeed
        self.run_facts = run = resolve_run(cfg, self.device.type)
        if run.host_allocator == "reuse":
            reuse_freed_memory()  # before construction: its temporaries are reused too
        init_distributed(pe, self.device, cfg.train.dist_timeout_s)
        p = cfg.parallel
        groups.initialize(run.layout)
        self.rank = dist.get_rank()
        rank_map = report_actual(pe.launcher)
        if rank_map and cfg.log.progress:
            print(rank_map, flush=True)
        seed_everything(cfg.train.seed, self.device.type)
        split = build_split(cfg)  # before the model: data that does not fit the config fails first

        self.pipelined = run.pipelined
        ds_config = run.ds_config()
        model = build_finetune_model(cfg, self.device) if finetuning(cfg) else build_model(run, self.device, ds_config)
        self.host_tensors = run.host_allocator == "lean"  # return freed host memory (host_memory)
        if self.host_tensors:
            tune_cpu_allocator()  # after construction: from DeepSpeed's setup on, freed tensors leave
        if cfg.model.moe.enabled:
            from megadeep.parallel.experts import deepspeed_moe_marker, register_with_deepspeed

            register_with_deepspeed()
            model.deepspeed_moe = deepspeed_moe_marker(cfg.model.moe.num_experts)
            set_loss_scale(model, 1.0 / cfg.train.grad_accum_steps)  # DeepSpeed's scaling of the LM loss
        if self.pipelined:
            from megadeep.pipeline import check_grid

            check_grid(model.mpu())
            mpu = None  # the pipeline engine takes its groups from the module's topology
        else:
            mpu = groups
        adam = choose_adam(ds_config, self.device.type, run.adam)
        self.optimizer_name = adam.name
        o = cfg.optim
        share_zero3_fp32_master()  # DeepSpeed 0.19's fp32 ZeRO-3 keeps a second master copy (ds_fixes)
        self.engine, optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, o.weight_decay), optimizer=adam.client,
            config=ds_config, mpu=mpu,
            lr_scheduler=lr_scheduler(cfg.train.steps, o.warmup_steps, o.lr, o.min_lr),
        )
        skip_identity_allreduce(self.engine, p.dp * p.cp)
        if self.host_tensors:
            release_freed_memory()  # DeepSpeed's setup copies
        self.clip = ClipByGlobalNorm(optimizer, model.parameters(), o.grad_clip) if run.megadeep_clips else None
        dp_rank, dp = groups.get_data_parallel_rank(), groups.get_data_parallel_world_size()
        t = cfg.train
        self.train_data = Loader(split.train, t.micro_batch_size, dp_rank, dp, t.seed)
        self.val_data = split.val
        self.step = 0
        dist.barrier()  # ranks measure a CPU peak at the same moment, so each gets its share of the cores
        self.log = MetricsLog(cfg, dist.get_world_size(), peak_flops(self.device, t.precision), self.rank == 0)
        self.comm = CommMeter() if cfg.log.comm_stats else None
        self.guard = FaultGuard(t.max_consecutive_skips, t.loss_spike_factor, self.rank == 0)
        # what a checkpoint holds: the trained parameters (a LoRA run's adapters; its base stays finetune.base)
        params = model.canonical_parameters() if self.pipelined else {
            n: p for n, p in model.named_parameters() if p.requires_grad}
        self.checkpoints = CheckpointManager(cfg, self.engine, params, self.device.type)
        if self.rank == 0 and cfg.log.progress:
            ep = f" EP={p.ep}" if p.ep > 1 else ""
            active = f" ({active_params(cfg.model) / 1e6:.2f}M active)" if cfg.model.moe.enabled else ""
            kernels = "fused csrc" if ops.use_fused(cfg.model.fused_kernels) else "PyTorch"  # cached: the model's choice
            data = f"{cfg.data.source} {cfg.data.corpus or ','.join(cfg.data.paths)}"
            print(f"megadeep: {cfg.name} | layout TP={p.tp}{run.describe_cp} DP={p.dp} PP={p.pp}{ep} | "
                  f"{num_params(cfg.model) / 1e6:.2f}M params{active} | optimizer {self.optimizer_name} | "
                  f"device {self.device} x{dist.get_world_size()} | ZeRO-{run.zero_stage} | kernels {kernels} | "
                  f"data {data}", flush=True)
            if self.pipelined:
                print(model.stage_map(), flush=True)
        self.maybe_resume()
        self.watchdog = None
        if t.hang_timeout_s:
            from megadeep.training.watchdog import Watchdog

            self.watchdog = Watchdog(cfg.checkpoint.dir, self.rank, dist.get_world_size(), t.hang_timeout_s)

    def _extras(self) -> dict:
        """What the step record carries beyond the loop's own numbers."""
        extras = {"skipped_steps": self.engine.skipped_steps, "memory": memory_mb(self.device)}
        if self.engine.fp16_enabled():
            opt = self.engine.optimizer
            extras["loss_scale"] = float(getattr(opt, "cur_scale", None) or opt.loss_scale)
        if self.comm is not None:
            extras["comm_bytes"] = self.comm.step()
        return extras

    def _dp_mean_vector(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().double().cpu()
        if groups.get_data_parallel_world_size() > 1:
            dist.all_reduce(value, group=groups.get_data_parallel_group())
            value /= groups.get_data_parallel_world_size()
        return value

    def _dp_mean(self, value: torch.Tensor) -> float:
        return self._dp_mean_vector(value).item()

    def train_step(self, after_backward: Callable[[int], None] | None = None) -> StepResult:
        """One optimizer step; ``after_backward(micro)`` runs after each micro-batch's backward, before
        DeepSpeed's step for it (``megadeep memory`` measures there)."""
        t = self.cfg.train
        start = time.perf_counter()
        lr = self.engine.get_lr()[0]
        if self.pipelined:  # 1F1B over grad_accum_steps micro-batches; the loss comes back DP-averaged
            if after_backward is not None:
                raise NotImplementedError("per-micro-batch hooks need the non-pipelined loop (parallel.pp=1)")
            step_loss = self.engine.train_batch(self.train_data).item()
        else:
            losses = []
            for micro in range(t.grad_accum_steps):
                tokens, targets = (x.to(self.device) for x in next(self.train_data))
                loss = self.engine(tokens, targets)
                self.engine.backward(loss)
                if self.host_tensors:  # the activations, before the optimizer step (Adam's moments at step 1)
                    release_freed_memory()
                if after_backward is not None:
                    after_backward(micro)
                self.engine.step()
                losses.append(loss.detach())
            step_loss = self._dp_mean(torch.stack(losses).mean())
        grad_norm = self.clip.norm if self.clip else self.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        self.step += 1
        elapsed = time.perf_counter() - start
        return StepResult(self.step, step_loss, float(lr), grad_norm,
                          t.global_batch_size * t.seq_len / elapsed, elapsed, not self.engine.was_step_applied(),
                          moe=self._moe_metrics())

    def _moe_metrics(self) -> dict | None:
        """The step's router metrics, averaged over micro-batches, MoE layers (on every pipeline stage) and DP."""
        if not self.cfg.model.moe.enabled:
            return None
        v = take_stats(self.engine.module, self.cfg.model.moe.num_experts)
        if groups.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(v, group=groups.get_pipeline_model_parallel_group())
        return stats_record(self._dp_mean_vector(v[1:] / v[0]))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_data is None:
            return None
        t = self.cfg.train
        dp_rank, dp = groups.get_data_parallel_rank(), groups.get_data_parallel_world_size()
        loader = Loader(self.val_data, t.micro_batch_size, dp_rank, dp, t.seed, shuffle=False)
        # eval_iters global batches, whatever the layout, so validation loss is comparable across layouts
        if self.pipelined:  # each eval_batch pulls grad_accum_steps micro-batches, returns the DP mean
            return sum(self.engine.eval_batch(loader).item() for _ in range(t.eval_iters)) / t.eval_iters
        self.engine.eval()
        n = t.eval_iters * t.grad_accum_steps
        losses = [self.engine(*(x.to(self.device) for x in next(loader))) for _ in range(n)]
        self.engine.train()
        return self._dp_mean(torch.stack(losses).mean())

    def run(self) -> Summary:
        t = self.cfg.train
        summary = Summary()
        try:
            while self.step < t.steps:
                r = self.train_step()
                if self.watchdog is not None:
                    self.watchdog.progress(r.step)
                extras = self._extras()  # before any save: comm bytes and memory are the step's own
                self.guard.observe(r)
                summary.history.append(r)
                if r.skipped:  # an abort names the last good checkpoint: commit the one in flight first
                    self.checkpoints.wait()
                self.guard.check(self.checkpoints.last_good)
                stop = self._stop_requested() if self.step < t.steps else 0
                # The step is saved before anything else can fail (logging, evaluation): a crash there
                # loses no finished work.
                if stop and self.cfg.checkpoint.dir:
                    self.save_checkpoint()
                elif not r.skipped or self.step == t.steps:  # the last good checkpoint predates a bad streak
                    self.checkpoints.after_step(self._train_state(), final=self.step == t.steps)
                summary.records.append(self.log.step({**vars(r), **extras}))
                if stop:
                    summary.preempted, summary.stop_signal = True, stop
                    break
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                    self.checkpoints.wait()  # commit a background save of this step before evaluation can fail
                    val = self.evaluate()
                    if val is not None:
                        summary.val_losses.append((self.step, val))
                        self.log.evaluation(self.step, val)
        finally:
            self.log.close()
        if summary.history and not summary.preempted and all(r.skipped for r in summary.history):
            raise RunAborted(f"no update was applied: all {len(summary.history)} steps of this run had a non-finite "
                             "loss or gradient and were skipped; lower optim.lr or fix the data")
        return summary

    def _stop_requested(self) -> int:
        """The stop signal all ranks act on after this step, or 0: USR1 without ``checkpoint.dir`` has
        nothing to save for a requeue and is ignored; TERM stops regardless (SIGKILL follows it)."""
        signum = preemption.any_rank_requested(self.stop, self.device)
        if not signum:
            return 0
        self.stop.clear()
        name, saving = signal.Signals(signum).name, bool(self.cfg.checkpoint.dir)
        if not saving and signum == signal.SIGUSR1:
            if self.rank == 0:
                print(f"megadeep: {name} received but checkpoint.dir is not set; training on", flush=True)
            return 0
        if self.rank == 0:
            what = "saving a checkpoint after" if saving else "no checkpoint.dir: nothing saved after"
            print(f"megadeep: {name} received; {what} step {self.step} and stopping", flush=True)
        return signum

    # -- checkpoints (megadeep.checkpoint) ----------------------------------------------------------
    def _train_state(self) -> TrainState:
        return TrainState(self.step, self.train_data.consumed)

    def save_checkpoint(self) -> None:
        self.checkpoints.save(self._train_state())

    def maybe_resume(self) -> bool:
        """Continue from ``checkpoint.resume`` (auto: the newest usable checkpoint in ``checkpoint.dir``;
        a SLURM restart always continues from ``checkpoint.dir`` when it holds one)."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        state = self.checkpoints.resume(prefer_dir=restarts > 0)
        if state is not None:
            self.step, self.train_data.consumed = state.step, state.consumed_samples
        if state is not None or restarts:
            self._record_restart(restarts)
        return state is not None

    def _record_restart(self, restarts: int) -> None:
        """Into the metrics file: which start this is, the step it continues from, where it runs (the
        steps after that one may be in the file already, from the attempt that was cut short)."""
        import socket

        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, os.environ.get("SLURMD_NODENAME") or socket.gethostname())
        self.log.restart({"restart": restarts, "resumed_from_step": self.step,
                          "hosts": sorted(set(hosts)), "world_size": len(hosts)})

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
        self.engine.destroy()
        groups.destroy()


def train(cfg: RunConfig) -> Summary:
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
