"""shard/unshard: the one definition of how TP pieces relate to full tensors."""
import pytest
import torch

from megadeep.parallel.sharding import shard, unshard


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("blocks", [None, (8, 8), (8, 4, 4)])
def test_shard_unshard_round_trip(world, blocks):
    full = torch.arange(16 * 3).reshape(16, 3)
    pieces = [shard(full, 0, r, world, blocks) for r in range(world)]
    assert torch.equal(unshard(pieces, 0, blocks), full)
    if blocks and world > 1:  # every rank holds a slice of every block
        starts = [0, *torch.tensor(blocks).cumsum(0).tolist()[:-1]]
        for r, piece in enumerate(pieces):
            rows = piece[:, 0] // 3
            expected = [s + r * (b // world) + i for s, b in zip(starts, blocks) for i in range(b // world)]
            assert rows.tolist() == expected


def test_uneven_split_is_refused():
    with pytest.raises(ValueError):
        shard(torch.zeros(6, 2), 0, 0, 4, None)
    with pytest.raises(ValueError):
        shard(torch.zeros(12, 2), 0, 0, 4, (6, 6))
