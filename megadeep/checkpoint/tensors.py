"""Checkpoint tensors by canonical name: how a stored TP piece relates to the full tensor, and how
to cut the piece any other layout needs.

Files hold, per kind (``model`` = fp32 master weights, ``exp_avg``, ``exp_avg_sq``) and per
(TP rank, PP stage), each parameter's TP piece exactly as the layer holds it (vocab padding included),
gathered over DP. ``meta.json`` describes each canonical parameter once: its full unpadded shape,
``partition_dim``/``partition_blocks`` and the pipeline stage whose files hold it. Because padded
vocabulary rows are zero in weights and both moments (they never get a gradient), dropping them and
padding again for another TP size is exact.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from megadeep.errors import CheckpointError
from megadeep.parallel.sharding import shard, unshard

KINDS = ("model", "exp_avg", "exp_avg_sq")
MOMENTS = KINDS[1:]
# Parameters whose dim 0 is the (padded) vocabulary.
VOCAB_PARAMS = ("tok_embeddings.embedding.weight", "output.proj.weight")


def tensor_file(kind: str, tp_rank: int, pp_rank: int) -> str:
    return f"{kind}-tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng/rank{rank:05d}.pt"


@dataclass
class ParamSpec:
    shape: list[int]  # full TP=1 shape, vocabulary unpadded
    partition_dim: int | None
    partition_blocks: list[int] | None  # full-tensor sizes of blocks sharded separately (fused QKV, SwiGLU)
    stage: int  # the pipeline stage whose files hold it
    vocab: bool = False

    @classmethod
    def of(cls, name: str, param: torch.Tensor, tp: int, stage: int, vocab_size: int) -> "ParamSpec":
        dim = getattr(param, "partition_dim", None)
        shape = list(getattr(param, "ds_shape", param.shape))  # ZeRO-3 params are empty between uses
        if dim is not None:
            shape[dim] *= tp
        vocab = name in VOCAB_PARAMS
        if vocab:
            shape[0] = vocab_size
        blocks = getattr(param, "partition_blocks", None)
        return cls(shape, dim, list(blocks) if blocks else None, stage, vocab)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ParamSpec":
        shape, dim, blocks = d["shape"], d["partition_dim"], d["partition_blocks"]
        if not (isinstance(shape, list) and all(isinstance(x, int) for x in shape)
                and (dim is None or isinstance(dim, int)) and (blocks is None or isinstance(blocks, list))):
            raise ValueError(f"shape {shape!r}, partition_dim {dim!r}, partition_blocks {blocks!r}")
        return cls(shape, dim, blocks, int(d["stage"]), bool(d["vocab"]))

    @property
    def blocks(self) -> tuple[int, ...] | None:
        return tuple(self.partition_blocks) if self.partition_blocks else None


def full_from_pieces(pieces: list[torch.Tensor], spec: ParamSpec) -> torch.Tensor:
    """The full unpadded tensor from every TP rank's piece (rank order)."""
    full = unshard(pieces, spec.partition_dim, spec.blocks)
    if spec.vocab:
        full = full[: spec.shape[0]]
    if list(full.shape) != spec.shape:
        raise ValueError(f"pieces of shapes {[tuple(p.shape) for p in pieces]} do not make the full shape {spec.shape}")
    return full


def piece_from_full(full: torch.Tensor, spec: ParamSpec, tp_rank: int, tp: int, padded_vocab: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s piece of ``full`` for a layout with ``tp`` ranks (vocabulary padded to ``padded_vocab``)."""
    if spec.vocab and padded_vocab > full.shape[0]:
        full = torch.cat([full, full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])])
    return shard(full, spec.partition_dim, tp_rank, tp, spec.blocks).contiguous()


class TensorReader:
    """Reads canonical tensors from an opened checkpoint, for any target TP size."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.tp = int(ckpt.meta["layout"]["tp"])
        try:
            self.specs = {n: ParamSpec.from_json(s) for n, s in ckpt.meta["params"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}/meta.json: malformed parameter spec ({type(e).__name__}: {e})") from None

    def files(self, kind: str, name: str, tp_rank: int, tp: int) -> list[str]:
        """The files a rank at ``(tp_rank, tp)`` reads for ``name``: its own piece, or all of them."""
        stage = self.specs[name].stage
        ranks = [tp_rank] if tp == self.tp else range(self.tp)
        return [tensor_file(kind, r, stage) for r in ranks]

    def full(self, kind: str, name: str) -> torch.Tensor:
        spec = self.specs[name]
        pieces = [self.ckpt.read_tensors(tensor_file(kind, r, spec.stage), [name])[name] for r in range(self.tp)]
        return full_from_pieces(pieces, spec)

    def piece(self, kind: str, name: str, tp_rank: int, tp: int, padded_vocab: int) -> torch.Tensor:
        spec = self.specs[name]
        if tp == self.tp:
            own = self.ckpt.read_tensors(tensor_file(kind, tp_rank, spec.stage), [name])[name]
            if not spec.vocab or own.shape[0] * tp == padded_vocab:
                return own
        return piece_from_full(self.full(kind, name), spec, tp_rank, tp, padded_vocab)
