"""A character-level tokenizer for English and Chinese, built from the training corpus.

It is saved in the run as ``tokenizer/vocab.json`` (UTF-8 JSON, token -> id, special tokens
first) and ``tokenizer/tokenizer_config.json``, and loaded from there on resume: never rebuilt,
so ids stay the same whatever data the resuming machine has.
"""

from __future__ import annotations

import json
from pathlib import Path

from apt_model.errors import APTError

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "tokenizer_config.json"


class TokenizerError(APTError):
    """The tokenizer files are missing or malformed."""


class CharTokenizer:
    """Characters to ids and back.

    >>> tok = CharTokenizer.build("ab 中"); tok.decode(tok.encode("a中"))
    'a中'
    """

    def __init__(self, vocab: dict[str, int]):
        ids = sorted(vocab.values())
        if ids != list(range(len(ids))):
            raise TokenizerError("vocab.json: ids must be 0..N-1 without gaps")
        for i, s in enumerate(SPECIALS):
            if vocab.get(s) != i:
                raise TokenizerError(f"vocab.json: special token {s} must have id {i}")
        self.vocab = dict(vocab)
        self.inverse = {i: t for t, i in vocab.items()}
        self.unk_id = vocab["<unk>"]

    @classmethod
    def build(cls, text: str) -> "CharTokenizer":
        """Specials first, then every distinct character of ``text`` in code-point order."""
        chars = sorted(set(text))
        vocab = {s: i for i, s in enumerate(SPECIALS)}
        for ch in chars:
            vocab.setdefault(ch, len(vocab))
        return cls(vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(ch, self.unk_id) for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.inverse.get(int(i), "") for i in ids if int(i) >= len(SPECIALS))

    def files(self) -> dict[str, bytes]:
        """The two files that describe it, as bytes (names relative to ``tokenizer/``)."""
        vocab = json.dumps(self.vocab, ensure_ascii=False, indent=0, sort_keys=False).encode("utf-8")
        conf = json.dumps({"type": "char", "specials": SPECIALS, "vocab_size": len(self)}, indent=1).encode("utf-8")
        return {VOCAB_FILE: vocab, CONFIG_FILE: conf}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            (folder / name).write_bytes(data)

    @classmethod
    def load(cls, folder: str | Path) -> "CharTokenizer":
        """Read ``vocab.json`` from ``folder``."""
        path = Path(folder) / VOCAB_FILE
        try:
            vocab = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path}: cannot read ({e}); expected a JSON object token -> id") from None
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise TokenizerError(f"{path}: expected a JSON object token -> id")
        return cls(vocab)
