"""Document masking (``data.document_mask``): a packed sample's logits equal each document's run alone."""
import pytest
import torch

from megadeep.config.schema import ModelConfig
from megadeep.model import Transformer
from megadeep.model.attention import Documents, DocumentSpec
from tests.helpers import read_json, run_torchrun

SEP = 2
CFG = ModelConfig(vocab_size=50, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=64, max_seq_len=64,
                  vocab_pad_unit=8)


def packed_sample(lengths, seed=0):
    """Documents of the given lengths (sep included), packed back to back; the last one is cut off."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        d = torch.randint(3, 50, (n,), generator=g)
        d[-1] = SEP
        docs.append(d)
    return docs


def test_documents_of_ids_and_positions():
    tokens = torch.tensor([[5, 6, SEP, 7, SEP, 8, 9, 9]])
    docs = Documents.of(tokens, DocumentSpec(SEP, restart_positions=True))
    assert docs.ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert docs.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


@pytest.mark.parametrize("restart", [False, True])
def test_packed_logits_equal_documents_alone(restart):
    torch.manual_seed(0)
    model = Transformer(CFG, documents=DocumentSpec(SEP, restart_positions=restart))
    model.init_weights(0)
    plain = Transformer(CFG)  # the same weights without masking: each document run alone
    plain.load_state_dict(model.state_dict())
    docs = packed_sample([9, 17, 5, 21, 12])  # 64 tokens
    with torch.no_grad():
        packed = model(torch.cat(docs)[None])[0]
        alone = torch.cat([plain(d[None])[0] for d in docs])
        unmasked = plain(torch.cat(docs)[None])[0]
    err = ((packed - alone).abs().max() / alone.abs().max()).item()
    assert err <= 1e-5, err
    assert ((unmasked - alone).abs().max() / alone.abs().max()).item() > 1e-2  # masking is what makes them equal


def test_packed_logits_equal_documents_alone_under_context_parallelism(tmp_path):
    """CP=2 and CP=4, Ulysses and all-gather-KV, global or restarted RoPE positions (tests/workers/cp_docs.py)."""
    out = tmp_path / "errors.json"
    run_torchrun("cp_docs.py", 4, str(out))
    errors = read_json(out)
    assert len(errors) == 8, errors
    for case, err in errors.items():
        assert err <= 1e-5, (case, err)
