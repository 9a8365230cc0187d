"""Data: from raw text to the micro-batches each data-parallel rank reads.

``tokenizer`` (SentencePiece), ``reader`` (text / JSON-lines / Parquet input, a datatrove reader),
``cleaning`` (normalisation, quality rules), ``dedup`` (exact, MinHash-LSH with exact-Jaccard
confirmation), ``pii`` (scrubbing), ``steps`` (megadeep's datatrove pipeline steps), ``preprocess``
(the stages, on datatrove's local or SLURM executor),
``shards`` (files and manifest), ``dataset`` (packing, split, blending), ``sampler`` (DP sharding,
resume), ``loader`` (what the trainer reads), ``prepare`` (bundled corpora, vocab from the tokenizer),
``bytes`` (the byte-level source), ``cli`` (``megadeep data ...``).
"""
