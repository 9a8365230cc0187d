"""Tokenizer throughput of ``megadeep data preprocess``: a Hugging Face ``tokenizer.json`` (byte-level BPE,
``tokenizers``) vs SentencePiece BPE, each with 1 and 2 worker processes, on the Shakespeare corpus.

Both tokenizers are trained on the same sample with the same vocabulary size (8000). The same input (the
preprocess benchmark's JSON-lines corpus, one copy: no duplicates) is preprocessed with each tokenizer and
worker count, alternated, twice each, keeping the fastest of each. Reported: end-to-end MB/s (wall clock;
every stage, the same work for both tokenizers but the tokenize step) and the tokenize stage's own rate per
core (raw input MB over the CPU seconds of that stage, summed over workers), with the HF/SentencePiece
ratio measured in the same run. ``tokenizers`` may use several threads per ``encode_batch`` call
(TOKENIZERS_PARALLELISM), which the stage's process time counts.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from megadeep.config.load import settings_from_overrides
from megadeep.data.corpora import corpus
from megadeep.data.preprocess import PreprocessSettings, preprocess, tokenizer_sample
from megadeep.data.tokenizer import TokenizerSettings, train_hf_bpe, train_tokenizer

VOCAB = 8000


def run(quick: bool = False) -> dict:
    from bench.preprocess import make_corpus

    with tempfile.TemporaryDirectory(prefix="megadeep-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        size = make_corpus(tmp / "in", 1)
        inputs = [str(tmp / "in")]
        settings = settings_from_overrides(PreprocessSettings, list(corpus("shakespeare").preprocess))
        sample = list(tokenizer_sample(inputs, settings, 1 << 30))
        train_tokenizer(sample, tmp / "sp", TokenizerSettings(vocab_size=VOCAB))
        train_hf_bpe(sample, tmp / "hf", VOCAB)
        runs: dict[str, dict] = {}
        for _ in range(1 if quick else 2):  # alternated, best of each: the machine is shared
            for kind in ("sp", "hf"):
                for workers in (1, 2):
                    settings.workers = workers
                    m = preprocess(inputs, tmp / f"out-{kind}{workers}", tmp / kind, settings, overwrite=True)
                    key = f"{kind}_{workers}"
                    if key not in runs or m["stats"]["wall_seconds"] < runs[key]["wall_seconds"]:
                        runs[key] = {**m["stats"], "tokens": m["tokens"]}
        mb = size / 1e6
        out = {"input_mb": round(mb, 2), "cores": os.cpu_count(), "vocab": VOCAB}
        for key, s in runs.items():
            out[key] = {"end_to_end_mb_s": round(mb / s["wall_seconds"], 3),
                        "tokenize_mb_s_per_core": round(mb / s["stage_seconds"]["tokenize"], 2),
                        "wall_seconds": s["wall_seconds"], "tokenize_cpu_s": round(s["stage_seconds"]["tokenize"], 3),
                        "tokens": s["tokens"]}
        for w in (1, 2):
            out[f"hf_vs_sp_tokenize_{w}"] = round(out[f"hf_{w}"]["tokenize_mb_s_per_core"]
                                                  / out[f"sp_{w}"]["tokenize_mb_s_per_core"], 2)
            out[f"hf_vs_sp_end_to_end_{w}"] = round(out[f"hf_{w}"]["end_to_end_mb_s"] / out[f"sp_{w}"]["end_to_end_mb_s"], 2)
        out["speedup_2_vs_1"] = {k: round(out[f"{k}_2"]["end_to_end_mb_s"] / out[f"{k}_1"]["end_to_end_mb_s"], 2)
                                 for k in ("sp", "hf")}
        out["load_average_1min"] = round(os.getloadavg()[0], 2)
        return out


def headline(r: dict) -> list[dict]:
    from bench.common import row

    return [row(f"tokenize stage MB/s per core, HF tokenizer.json vs SentencePiece, {w} worker(s)",
                r[f"hf_{w}"]["tokenize_mb_s_per_core"], r[f"sp_{w}"]["tokenize_mb_s_per_core"],
                r[f"hf_vs_sp_tokenize_{w}"]) for w in (1, 2)]


def main() -> None:
    from bench.common import save

    r = run(quick="--quick" in sys.argv)
    print(json.dumps(r, indent=1))
    print(f"wrote {save('tokenizer_throughput', r)}")


if __name__ == "__main__":
    main()
