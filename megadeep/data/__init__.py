"""Data: from raw text to the micro-batches each data-parallel rank reads.

``tokenizer`` (SentencePiece), ``reader`` (text / JSON-lines input), ``cleaning`` (normalisation,
quality rules), ``dedup`` (exact, MinHash-LSH), ``pii`` (scrubbing), ``preprocess`` (the pipeline),
``shards`` (files and manifest), ``dataset`` (packing, split, blending), ``sampler`` (DP sharding,
resume), ``loader`` (what the trainer reads), ``prepare`` (bundled corpora, vocab from the tokenizer),
``bytes`` (the byte-level source), ``cli`` (``megadeep data ...``).
"""
