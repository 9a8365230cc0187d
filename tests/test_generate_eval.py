"""``megadeep generate`` and ``megadeep eval`` on a tiny model trained by ``megadeep train``: greedy tokens
equal transformers' ``generate`` on the exported model (TP=1 in process, TP=2 through the CLI), the KV
cache changes nothing, seeded sampling repeats; eval reproduces the trainer's validation loss at any layout."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, run_torchrun, write_text

TINY = ["name=gen", "data.source=bytes", "model.vocab_size=256", "model.dim=64", "model.n_layers=2",
        "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=128", "model.max_seq_len=64", "train.seq_len=64",
        "train.micro_batch_size=4", "train.global_batch_size=16", "train.steps=300", "optim.lr=0.01",
        "optim.warmup_steps=10", "train.eval_every=300", "train.eval_iters=2", "log.progress=false"]
PROMPTS = ["The of and", "It", "Was for on are with the", "He said"]


def megadeep(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "megadeep", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint after 300 steps (val loss ~1.9 nats/byte: it spells words) and the val loss logged."""
    tmp = tmp_path_factory.mktemp("gen")
    text = write_text(tmp / "text.txt")
    (tmp / "base.yaml").write_text("name: gen\n")
    proc = megadeep("train", "base.yaml", *TINY, f"data.paths=[{text}]", f"checkpoint.dir={tmp / 'ck'}",
                    f"log.metrics_file={tmp / 'metrics.jsonl'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert val < 2.3, val  # trained: greedy text is not one repeated byte
    return tmp, tmp / "ck", val


def test_greedy_matches_transformers_at_tp1_and_tp2(trained):
    from transformers import LlamaForCausalLM

    from megadeep.checkpoint.hf import export_hf
    from megadeep.inference.generate import Sampling, forward, generate
    from megadeep.inference.load import load_model

    tmp, ck, _ = trained
    model, _ = load_model(ck)
    ids = [list(p.encode()) for p in PROMPTS]

    # the decoding forward is the training forward on an unpadded batch
    tokens = torch.tensor([ids[2][:8], ids[0][:8]])
    ours = forward(model, tokens, torch.arange(8).expand(2, 8), torch.ones(2, 8, dtype=torch.bool))
    assert torch.allclose(ours, model(tokens)[..., :256], rtol=0, atol=1e-5)

    n = 24
    greedy = generate(model, ids, Sampling(max_new_tokens=n)).tokens
    assert generate(model, ids, Sampling(max_new_tokens=n, use_cache=False)).tokens == greedy
    assert len({tuple(g) for g in greedy}) > 1 and all(len(set(g)) > 3 for g in greedy)

    hf = LlamaForCausalLM.from_pretrained(export_hf(ck, tmp / "hf"), dtype=torch.float32).eval()
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    out = hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert out[:, width:].tolist() == greedy

    sampled = [generate(model, ids, Sampling(max_new_tokens=n, temperature=0.9, top_k=40, top_p=0.9, seed=s)).tokens
               for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2] and sampled[0] != greedy

    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    proc = megadeep("generate", str(ck), "--prompts", "prompts.jsonl", "--nproc", "2", "--max-new-tokens", str(n),
                    "--out", "tp2.jsonl", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp / "tp2.jsonl").read_text().splitlines()]
    assert [r["prompt_tokens"] for r in rows] == ids
    assert [r["tokens"] for r in rows] == greedy
    assert "at TP=2" in proc.stderr and "tokens/s" in proc.stderr


def test_generate_refuses_bad_input_in_one_line(trained):
    tmp, ck, _ = trained
    (tmp / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    cases = [(["--prompts", "bad.jsonl"], "bad.jsonl:2"),
             (["--prompt", "x" * 60, "--max-new-tokens", "10"], "exceeds the model's context of 64"),
             (["--prompt", "hi", "--top-p", "0"], "top_p"),
             (["--prompt", "hi", "--prompts", "bad.jsonl"], "exactly one"),
             (["--prompt", "hi", "--max-new-tokens", "8", "--nproc", "3"], "does not divide")]
    for args, message in cases:
        proc = megadeep("generate", str(ck), *args, *([] if "--nproc" in args else ["--nproc", "2"]), cwd=tmp, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_eval_equals_trainer_validation_loss_at_any_layout(trained):
    tmp, ck, val = trained
    for args in ([], ["--nproc", "2", "--tp", "2"], ["--nproc", "2"]):
        proc = megadeep("eval", str(ck), *args, cwd=tmp)
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(args, result["loss"], val)
        assert abs(result["loss"] - val) <= 1e-6 * val, (args, result, val)
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    # named datasets: the run's own text again (its held-out split: the same loss) and another text
    other = write_text(tmp / "other.txt", 6000, seed=3)
    proc = megadeep("eval", str(ck), "--data", str(tmp / "text.txt"), "--data", str(other), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    same, different = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert same["data"] == str(tmp / "text.txt") and abs(same["loss"] - val) <= 1e-6 * val
    assert different["data"] == str(other) and different["loss"] != same["loss"] and different["loss"] < 2.5


def byte_level_tokenizer(folder):
    """An HF tokenizer whose ids are UTF-8 bytes (GPT-2's byte→character table, no merges), so
    lm-eval's HF model tokenises as megadeep's bytes runs do. EOS is byte 0, the harness's end of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    chars = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chars[0], pad_token=chars[0]).save_pretrained(folder)


def test_lm_eval_adapter_matches_lm_eval_hf_model(trained, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import megadeep.inference.harness  # noqa: F401  registers "megadeep"
    from megadeep.checkpoint.hf import export_hf

    tmp, ck, _ = trained
    hf_dir = export_hf(ck, tmp / "hf_lm_eval")
    byte_level_tokenizer(hf_dir)
    rng = __import__("random").Random(1)
    words = "the of and to a in is it you that he was for on are with".split()
    rows = []
    for _ in range(16):  # the right answer is words, the others letter salad: a trained model mostly knows
        choices = [" " + " ".join(rng.choice(words) for _ in range(2)) + "."]
        choices += [" " + "".join(rng.choice("qxzjvkw") for _ in range(6)) + "." for _ in range(2)]
        answer = rng.randrange(3)
        choices[0], choices[answer] = choices[answer], choices[0]
        rows.append({"question": " ".join(rng.choice(words) for _ in range(5)).capitalize(), "choices": choices,
                     "answer": answer})
    (tmp / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "mc.yaml").write_text(
        f"task: megadeep_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    tasks = TaskManager(include_path=str(tmp / "tasks"))
    ours, theirs = (lm_eval.simple_evaluate(model=name, model_args=args, tasks=["megadeep_mc"], task_manager=tasks,
                                            log_samples=True)
                    for name, args in (("megadeep", f"checkpoint={ck}"),
                                       ("hf", f"pretrained={hf_dir},dtype=float32,device=cpu")))
    acc = ours["results"]["megadeep_mc"]["acc,none"]
    assert acc == theirs["results"]["megadeep_mc"]["acc,none"] and acc >= 0.75, acc
    a, b = ([r[0] for s in run["samples"]["megadeep_mc"] for r in s["resps"]] for run in (ours, theirs))
    assert len(a) == 48 and [g for _, g in a] == [g for _, g in b]
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, b)) <= 1e-5 * max(abs(y) for y, _ in b)
    run_torchrun("harness.py", 2, str(tmp / "tp2.json"), str(ck), "megadeep_mc", str(tmp / "tasks"),
                 env={"HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    tp2 = json.loads((tmp / "tp2.json").read_text())
    assert tp2["tp"] == 2 and tp2["acc"] == acc and [g for _, g in tp2["resps"]] == [g for _, g in a]
    assert max(abs(x - y) for (x, _), (y, _) in zip(tp2["resps"], a)) <= 1e-5 * max(abs(y) for y, _ in a)

    # rolling log-likelihood (windows longer than the context) and generate_until, request by request
    lms = [get_model("megadeep").create_from_arg_string(f"checkpoint={ck}"),
           get_model("hf").create_from_arg_string(f"pretrained={hf_dir},dtype=float32,device=cpu")]
    text = (tmp / "text.txt").read_text()[:150]
    rolling = [lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)]) for lm in lms]
    assert abs(rolling[0][0] - rolling[1][0]) <= 1e-5 * abs(rolling[1][0]), rolling
    request = Instance("generate_until", {}, ("The of and", {"until": ["."], "max_gen_toks": 20, "do_sample": False}), 0)
    generated = [lm.generate_until([request]) for lm in lms]
    assert generated[0] == generated[1] and generated[0][0], generated
