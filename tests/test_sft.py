"""SFT on chat JSON lines: the loss mask is exactly the assistant turns, bad conversations are counted
by reason (never truncated), and a TP=2 × DP=2 run from a base checkpoint equals the single process."""
import json
import random
import subprocess
import sys

import pytest
import torch

from megadeep.checkpoint.convert import open_source
from megadeep.checkpoint.tensors import TensorReader
from megadeep.config.schema import ModelConfig
from megadeep.finetune.chat import END, read_conversations
from megadeep.model import Transformer
from tests.helpers import ROOT, WORDS, WORKERS, read_json, rel_err, run_torchrun, write_text
from tests.test_checkpoint_hf import save

PLANTED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
           {"role": "assistant", "content": "See you"}]
SFT = "data.format=chat,finetune.lora.rank=0,train.seq_len=96,model.max_seq_len=96"


def conversations(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [json.dumps({"messages": [{"role": "user", "content": say(2)}, {"role": "assistant", "content": say(3)}]})
            for _ in range(n)]


def test_loss_mask_is_exactly_the_assistant_tokens_and_bad_lines_are_counted(tmp_path):
    bad = ['{"messages": [', json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
           json.dumps({"messages": [{"role": "user", "content": "long"}, {"role": "assistant", "content": "x" * 140}]}),
           json.dumps({"messages": [{"role": "robot", "content": "?"}]}), json.dumps({"text": "not a chat"})]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([json.dumps({"messages": PLANTED}), *bad, *conversations(3)]) + "\n")
    data, counts = read_conversations([str(path)], 160)
    assert dict(counts) == {"kept": 4, "malformed_json": 1, "no_assistant": 1, "too_long": 1, "bad_messages": 2}
    tokens, targets = data.batch([0])
    trained = targets[0][targets[0] != -100]
    assert bytes(trained.tolist()).decode() == f"Hello!{END}See you{END}"
    # each trained target is the next input token, and only assistant bytes are trained
    inputs = tokens[0].tolist() + [0]
    assert all(inputs[i + 1] == t for i, t in enumerate(targets[0].tolist()) if t != -100)
    text = bytes(tokens[0].tolist()).decode().rstrip("\0")
    assert text.startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nHi there") and text.endswith(f"See you{END}\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    chat = tmp / "chat.jsonl"
    chat.write_text("\n".join(conversations(120)) + "\n")
    m = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=128, max_seq_len=32)
    model = Transformer(m)
    model.init_weights(seed=5)
    base = save(model, tmp / "base", step=0)
    proc = subprocess.run([sys.executable, str(WORKERS / "lora.py"), str(tmp / "single.json"), str(chat), str(base),
                           SFT, "tp=1,zero=0"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "120 conversations kept, dropped: none" in proc.stderr
    run_torchrun("lora.py", 4, str(tmp / "multi.json"), str(chat), str(base), SFT, "tp=2,zero=1", "tp=2,zero=3")
    return tmp, {**read_json(tmp / "single.json"), **read_json(tmp / "multi.json")}


@pytest.mark.parametrize("zero", [1, 3])
def test_sft_tp2_dp2_equals_single_process(runs, zero):
    tmp, results = runs
    ref, ours = results["tp=1,zero=0"], results[f"tp=2,zero={zero}"]
    assert len(ref["loss"]) == 10 and ref["loss"][-1] < ref["loss"][0] - 0.5
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(ours["loss"], ref["loss"], strict=True))
    readers = [TensorReader(open_source(tmp / d)) for d in ("tp1_zero0", f"tp2_zero{zero}")]
    assert len(readers[0].specs) == 2 + 6 * 2  # a full fine-tune saves every weight (tied head)
    weight_err = max(rel_err(readers[1].full("model", n), readers[0].full("model", n)) for n in readers[0].specs)
    print(f"SFT TP2xDP2 ZeRO {zero}: loss rel err {loss_err:.1e}, weights rel err {weight_err:.1e}")
    assert loss_err <= 1e-5
    # full fine-tuning at lr 1e-2: Adam divides by √v, so fp32 reduction-order noise in near-zero
    # gradients grows to ~3e-4 of a weight in 10 steps (a wrong gradient would be O(1))
    assert weight_err <= 1e-3
    assert torch.isfinite(torch.tensor(ours["loss"])).all()


def test_chat_with_a_sentencepiece_tokenizer(tmp_path):
    from megadeep.config import load_config, resolve
    from megadeep.data.loader import build_split
    from megadeep.data.prepare import prepare_data
    from megadeep.data.tokenizer import TokenizerSettings, Tokenizer, train_tokenizer
    from megadeep.finetune.chat import render

    text = write_text(tmp_path / "t.txt", 4000).read_text()
    train_tokenizer([text, *(m["content"] for m in PLANTED)], tmp_path / "tok", TokenizerSettings(vocab_size=400))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join([json.dumps({"messages": PLANTED}), *conversations(20)]) + "\n")
    cfg = load_config(None, ["data.format=chat", "data.source=tokens", f"data.tokenizer={tmp_path / 'tok'}",
                             f"data.paths=[{chat}]", "train.seq_len=128", "model.max_seq_len=128"])
    cfg = prepare_data(resolve(cfg, 1), log=lambda _: None)
    assert cfg.model.vocab_size == 400
    tokens, targets = build_split(cfg).train.batch([0])
    tok = Tokenizer(tmp_path / "tok")
    rendered = "".join(t for t, _ in render(PLANTED))
    assert tokens[0][:len(tok.encode(rendered))].tolist() == tok.encode(rendered).tolist()  # segments = whole text
    trained = targets[0][targets[0] != -100].tolist()
    assert tok.decode(trained) == f"Hello!{END}See you{END}"
    assert trained == tok.encode(f"Hello!{END}").tolist() + tok.encode(f"See you{END}").tolist()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_tokenizers_own_chat_template_gives_transformers_tokens_and_masks_the_assistant_turns(tmp_path):
    from tokenizers import Tokenizer as Rust
    from transformers import PreTrainedTokenizerFast

    from megadeep.config import load_config, resolve
    from megadeep.data.loader import build_split
    from megadeep.data.prepare import prepare_data
    from megadeep.data.tokenizer import train_hf_bpe
    from megadeep.finetune.chat import TemplateCodec, codec_of

    folder = train_hf_bpe([" ".join(WORDS)] * 20 + ["Be brief. Hi there Hello! Bye See you"], tmp_path / "tok", 300)
    tok = Rust.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": PLANTED}) + "\n")
    cfg = load_config(None, ["data.format=chat", "data.source=tokens", f"data.tokenizer={folder}",
                             f"data.paths=[{path}]", "train.seq_len=128", "model.max_seq_len=128"])
    cfg = prepare_data(resolve(cfg, 1), log=lambda _: None)
    assert cfg.model.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    assert isinstance(codec_of(cfg), TemplateCodec)
    data = build_split(cfg).train
    hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
    want = hf.apply_chat_template(PLANTED, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)  # BatchEncoding in transformers 5
    n = len(want)
    assert data.tokens[0][:n].tolist() == list(want) and len(data) == 1
    trained = data.tokens[0][data.mask[0]].tolist()
    assert hf.decode(trained) == "Hello!<|im_end|>\nSee you<|im_end|>\n"
    # the mask is contiguous per assistant turn: two runs, each right after "<|im_start|>assistant\n"
    mask = data.mask[0][:n].tolist()
    starts = [i for i in range(n) if mask[i] and not mask[i - 1]]
    assert len(starts) == 2 and all(hf.decode(want[:s]).endswith("<|im_start|>assistant\n") for s in starts)
