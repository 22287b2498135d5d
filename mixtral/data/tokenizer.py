"""Mixtral's SentencePiece tokenizer: a model directory's tokenizer.model, else mistral-common's copy.

sentencepiece is the reference encoding (transformers 5's LlamaTokenizer differs on runs of spaces).
"""

from __future__ import annotations

import functools
from pathlib import Path

import sentencepiece as spm

from mixtral.errors import MixtralError


def default_tokenizer_path() -> Path:
    """Mixtral's own v1 tokenizer (vocab 32000, bos 1, eos 2), shipped inside mistral-common."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


class Tokenizer:
    def __init__(self, path: str | Path | None = None) -> None:
        path = Path(path) if path else default_tokenizer_path()
        if path.is_dir():
            path = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else default_tokenizer_path()
        if not path.is_file():
            raise MixtralError(f"tokenizer file {path} does not exist; pass a SentencePiece .model file")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise MixtralError(f"{path} is not a SentencePiece model ({exc})") from None
        self.path = path
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Plain encodings (no BOS/EOS) of many texts in one C++ call."""
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece(self, token_id: int) -> str:
        """The text a single token adds when streamed (SentencePiece's '▁' is a space)."""
        return self.sp.id_to_piece(token_id).replace("\u2581", " ")


@functools.cache
def load_tokenizer(path: str | None = None) -> Tokenizer:
    return Tokenizer(path)
