"""The built-in corpus: the standard library's own documentation (`pydoc_data.topics`), so training needs no download.

Each topic is cut into its sections (a heading line underlined with *, =, -, ~ or ^ starts one); every section is
one document (BOS + text + EOS). The tokenized dataset is cached under `cache_dir/builtin/`, keyed by the text and
the tokenizer, built once; concurrent builders are safe because the writer publishes files by atomic rename.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from mixtral.data import indexed
from mixtral.data.preprocess import tokenize_to_indexed
from mixtral.data.tokenizer import load_tokenizer

SECTION_START = re.compile(r"\n(?=[^\n]+\n[*=\-~^]{3,}\n)")


def documents() -> list[str]:
    """The documentation sections, in topic order."""
    from pydoc_data.topics import topics

    return [s.strip() for key in sorted(topics) for s in SECTION_START.split(topics[key]) if s.strip()]


def builtin_corpus(cache_dir: str | Path, tokenizer: str | None = None) -> Path:
    """The prefix of the tokenized built-in corpus, building it on first use."""
    tok = load_tokenizer(tokenizer)
    docs = documents()
    digest = hashlib.sha256(tok.path.read_bytes())
    for doc in docs:
        digest.update(doc.encode())
        digest.update(b"\0")
    prefix = Path(cache_dir) / "builtin" / f"pydoc-topics-{digest.hexdigest()[:16]}"
    if not indexed.exists(prefix):
        tokenize_to_indexed(docs, prefix, str(tok.path), append_eos=True, progress=False)
    return prefix
