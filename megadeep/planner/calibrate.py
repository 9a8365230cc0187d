"""``megadeep plan --calibrate``: time the kernels and collectives of the planned run on this machine.

The planner's table rates (compute.py, hardware.py) are what a GPU type usually does; a calibration
is what this machine does at the run's own shapes: every weight GEMM (forward and both backward
products) of each TP degree and micro-batch size the plan considers, the attention core (SDPA,
forward and backward), a streaming elementwise kernel, and all-reduce / all-gather / reduce-scatter /
send-recv between processes on this node (gloo on CPU, NCCL on GPUs). ``Calibration`` answers the
same questions as ``TableCompute`` and is saved as JSON to be reused (``--calibration FILE``).
Collectives are timed at a small and a large size: latency and bus bandwidth of t = α + traffic/β.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from megadeep.model.accounting import Gemm, attention_flops, backward_gemms, head_gemm, layer_gemms
from megadeep.planner.hardware import GPU, TRAFFIC, Cluster

MAX_GEMM_FLOPS = {"cpu": 2e10, "cuda": 1e13}  # bigger GEMMs are timed on a slice of their rows
COLLECTIVE_BYTES = (1 << 12, 1 << 22)  # latency, bandwidth


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _key(*xs) -> str:
    return ",".join(map(str, xs))


@dataclass
class Calibration:
    device: str
    act_bytes: int
    peak: float  # best GEMM FLOP/s measured (what MFU is taken against on a device without a data sheet)
    memory_rate: float  # bytes/s of a streaming elementwise kernel
    gemms: dict = field(default_factory=dict)  # "rows,inner,cols" -> seconds of one product
    attention: dict = field(default_factory=dict)  # "batch,heads,kv_heads,seq,head_dim" -> [forward, backward]
    collectives: dict = field(default_factory=dict)  # op -> [bus bytes/s, seconds per call]
    processes: int = 1
    host: str = ""

    # --- the questions TableCompute answers
    def gemm_s(self, g: Gemm) -> float:
        t = self.gemms.get(_key(g.rows, g.inner, g.cols))
        if t is None:  # a shape not measured: the measured rate of the nearest size in FLOPs
            t = g.flops / g.count / self._nearest_rate(g.flops / g.count)
        return t * g.count

    def _nearest_rate(self, flops: float) -> float:
        if not self.gemms:
            return self.peak
        def rate(k):
            r, i, c = map(int, k.split(","))
            return 2.0 * r * i * c
        k = min(self.gemms, key=lambda k: abs(rate(k) - flops) / max(rate(k), flops))
        return rate(k) / self.gemms[k]

    def elementwise_s(self, nbytes: float) -> float:
        return nbytes / self.memory_rate

    def attention_s(self, m, seq: int, micro_batch: int, tp: int, flash: bool, dropout: bool) -> tuple[float, float]:
        t = self.attention.get(_key(micro_batch, m.n_heads // tp, m.kv_heads // tp, seq, m.head_dim))
        if t is None:  # not measured: its FLOPs at the GEMM rate
            fwd = attention_flops(m, seq, micro_batch, tp) / self.peak
            return fwd, 2 * fwd
        return t[0], t[1]

    # --- persistence and use
    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        return cls(**json.loads(Path(path).read_text()))

    def apply(self, cluster: Cluster) -> Cluster:
        """``cluster`` with this machine's collective rates inside a node."""
        return replace(cluster, measured={op: tuple(v) for op, v in self.collectives.items()})

    def local_cluster(self, memory: float) -> Cluster:
        """This machine as a one-node cluster of ``processes`` ranks (the closed-loop benchmark's)."""
        gpu = GPU(self.device, memory, self.peak, self.peak, 0.0, 0.0, hbm=self.memory_rate, gemm_efficiency=1.0)
        return self.apply(Cluster(1, self.processes, gpu, 1.0, 1.0))


def run_shapes(model, seq: int, tps, micro_batches) -> tuple[set, set]:
    """(GEMM shapes, attention shapes) a plan over these TP degrees and micro-batch sizes runs."""
    gemms, attn = set(), set()
    for tp in tps:
        if model.n_heads % tp or model.kv_heads % tp:
            continue
        for b in micro_batches:
            tokens = b * seq
            for g in [*layer_gemms(model, tokens, tp), head_gemm(model, tokens, tp)]:
                for x in (g, *backward_gemms(g)):
                    gemms.add((x.rows, x.inner, x.cols))
            attn.add((b, model.n_heads // tp, model.kv_heads // tp, seq, model.head_dim))
    return gemms, attn


def time_gemm(rows: int, inner: int, cols: int, dtype, device, repeats: int) -> float:
    scale = max(1.0, 2.0 * rows * inner * cols / MAX_GEMM_FLOPS[device.type])
    r = max(1, int(rows / scale))
    a = torch.randn(r, inner, dtype=dtype, device=device)
    b = torch.randn(inner, cols, dtype=dtype, device=device)
    return _time(lambda: a @ b, repeats) * rows / r


def time_attention(b: int, heads: int, kv: int, seq: int, hd: int, dtype, device, repeats: int) -> list[float]:
    import torch.nn.functional as F

    q = torch.randn(b, heads, seq, hd, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(b, kv, seq, hd, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(b, kv, seq, hd, dtype=dtype, device=device, requires_grad=True)
    fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != heads)  # noqa: E731
    out = fwd()
    grad = torch.randn_like(out)
    both = _time(lambda: fwd().backward(grad), repeats)
    f = _time(fwd, repeats)
    return [f, max(both - f, f)]


def time_memory(dtype, device) -> float:
    n = (64 << 20) // torch.tensor([], dtype=dtype).element_size()
    x, y, z = (torch.randn(n, dtype=dtype, device=device) for _ in range(3))
    return 3 * x.numel() * x.element_size() / _time(lambda: torch.add(x, y, out=z), 5)


def collective_rates(device: torch.device) -> dict:
    """Bus bandwidth and latency of each collective over the default process group (every rank calls
    this together): op -> [bytes/s, seconds per call]."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()

    def run(op, nbytes):
        n = nbytes // 4
        x = torch.ones(n, device=device)
        if op == "all_reduce":
            return lambda: dist.all_reduce(x)
        if op == "all_gather":
            out_t = torch.empty(n * world, device=device)
            return lambda: dist.all_gather_single(out_t, x)
        if op == "reduce_scatter":
            big = torch.ones(n * world, device=device)
            return lambda: dist.reduce_scatter_single(x, big)
        peer = rank ^ 1  # p2p between rank pairs: one direction, as a pipeline send

        def p2p():
            if peer < world:
                (dist.send if rank % 2 == 0 else dist.recv)(x, peer)
        return p2p

    results = {}
    for op in TRAFFIC:
        try:
            (s_bytes, s_t), (l_bytes, l_t) = [(nb, _time_barriered(run(op, nb), dist)) for nb in COLLECTIVE_BYTES]
        except (RuntimeError, ValueError):  # e.g. a backend without reduce-scatter
            continue
        traffic = TRAFFIC[op](world)
        # two points give latency and bandwidth; when noise hides the difference, the large one alone
        bw = traffic * (l_bytes - s_bytes) / (l_t - s_t) if l_t > 2 * s_t else traffic * l_bytes / l_t
        results[op] = [bw, max(0.0, s_t - traffic * s_bytes / bw)]
    for op in TRAFFIC:  # ops the backend lacks: at the all-reduce's rate (what a fallback would run)
        results.setdefault(op, results["all_reduce"])
    return results


def _collective_worker(rank: int, world: int, port: int, out: str, backend: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    results = collective_rates(device)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _time_barriered(fn, dist, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_collectives(world: int) -> dict:
    """Bus bandwidth and latency of each collective among ``world`` processes on this machine."""
    import torch.multiprocessing as mp

    if world < 2:
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "collectives.json")
        mp.start_processes(_collective_worker, args=(world, port, out, backend), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())


def measure_kernels(model, seq: int, precision: str, tps, micro_batches, repeats: int = 3) -> Calibration:
    """Time this process's GEMMs, attention and memory rate at the shapes of a plan over ``tps`` ×
    ``micro_batches`` (no collectives: see ``collective_rates``)."""
    device = _device()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cpu":
        dtype = torch.float32  # bf16 matmuls are ~60x slower than fp32 on CPUs without AMX; runs use fp32
    gemm_shapes, attn_shapes = run_shapes(model, seq, tps, micro_batches)
    gemms = {_key(*s): time_gemm(*s, dtype, device, repeats) for s in sorted(gemm_shapes)}
    attention = {_key(*s): time_attention(*s, dtype, device, repeats) for s in sorted(attn_shapes)}
    rates = [2.0 * r * i * c / gemms[_key(r, i, c)] for r, i, c in gemm_shapes]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    return Calibration(name, torch.tensor([], dtype=dtype).element_size(), max(rates), time_memory(dtype, device),
                       gemms, attention, host=socket.gethostname())


def calibrate(model, seq: int, precision: str, tps, micro_batches, processes: int, repeats: int = 3) -> Calibration:
    """Kernels timed in this process, collectives among ``processes`` new ones on this machine."""
    cal = measure_kernels(model, seq, precision, tps, micro_batches, repeats)
    return replace(cal, collectives=measure_collectives(processes), processes=processes)
