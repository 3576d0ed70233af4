"""Caption cleaning, WordPiece vocab training and the batch tokenizer.

The cleaning rules follow ALBEF's `pre_caption` (lower-case, strip ``,.'!?"()*#:;~``, ``-`` and ``/``
become spaces, at most `max_words` words). The tokenizer emits ``[CLS] tokens`` in "albef" mode, the
convention the released ALBEF checkpoints were trained with (no trailing [SEP]), or ``[CLS] tokens [SEP]``
in "standard" mode.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in vocabularies we train
TOKENIZER_MODES = ("albef", "standard")

# One translation table instead of a chain of str.replace calls: deletions and the two space substitutions.
_CAPTION_TABLE = str.maketrans({**{c: None for c in ",.'!?\"()*#:;~"}, "-": " ", "/": " "})
_WHITESPACE = re.compile(r"\s+")


def clean_caption(caption: str, max_words: int, *, person_tag: bool = True) -> str:
    """ALBEF `pre_caption`: normalise a raw caption to lower-case words, at most `max_words` of them.
    person_tag=False leaves out the caption-only ``<person>`` -> ``person`` rewrite (VQA's `pre_question`)."""
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__} {caption!r}")
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    text = caption.lower()
    if person_tag:
        text = text.replace("<person>", "person")
    text = text.translate(_CAPTION_TABLE)
    words = _WHITESPACE.sub(" ", text).strip().split(" ")
    return " ".join(words[:max_words])


def train_wordpiece_vocab(texts: Iterable[str], out_file: str | Path, vocab_size: int) -> Path:
    """Train a lower-case WordPiece vocabulary on `texts` and write it as a BERT-style vocab.txt.

    The special tokens come first, in the order [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0..4), so a model built on
    this vocabulary uses pad id 0 like bert-base-uncased. When the corpus yields fewer than `vocab_size`
    tokens, the file is filled up with BERT-style ``[unusedN]`` entries: it always has exactly `vocab_size`
    lines, so a config can state the model's vocabulary size up front.
    """
    from tokenizers import BertWordPieceTokenizer  # imported here: only vocab builders need it

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.train_from_iterator(
        iter(texts),
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    # Write vocab.txt ourselves (id order, one token per line) rather than via save_model, whose file name
    # we do not control; the ids of a BERT vocab.txt are its line numbers.
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise RuntimeError("trained WordPiece vocabulary has non-contiguous ids")  # tokenizers bug guard
    if len(tokens) > vocab_size:
        raise RuntimeError(f"WordPiece trainer returned {len(tokens)} tokens for vocab_size {vocab_size}")
    tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    tmp.replace(out)
    logger.info("wrote a %d-token WordPiece vocabulary to %s", len(tokens), out)
    return out


class TextTokenizer:
    """Batch tokenizer around `transformers.BertTokenizerFast` with ALBEF's special-token convention.

    Calling it on B strings returns ``input_ids`` and ``attention_mask``, both LongTensor [B, L] with L the
    longest row in the batch (<= max_tokens, special tokens included), right-padded with the pad id.
    Picklable, so it can run inside DataLoader workers.
    """

    def __init__(self, tokenizer, *, max_tokens: int, mode: str = "albef", source: str = "") -> None:
        if mode not in TOKENIZER_MODES:
            raise ValueError(f"tokenizer mode must be one of {TOKENIZER_MODES}, got {mode!r}")
        n_special = 1 if mode == "albef" else 2
        if max_tokens < n_special + 1:
            raise ValueError(f"max_tokens must be >= {n_special + 1} in {mode!r} mode, got {max_tokens}")
        self._tok = tokenizer
        self._mode = mode
        self._max_tokens = max_tokens
        self._source = source
        # transformers silently appends special tokens missing from vocab.txt as "added" tokens with ids past
        # the vocabulary; a checkpoint's embedding table would not cover them, so insist on the base vocab.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        base = backend.get_vocab(with_added_tokens=False) if backend is not None else tokenizer.get_vocab()
        ids = {}
        for name in ("pad", "unk", "cls", "sep", "mask"):
            token = getattr(tokenizer, f"{name}_token", None)
            if token is None or str(token) not in base:
                raise ValueError(
                    f"tokenizer from {source or '<object>'} has no {name} token ({token}) in its vocabulary"
                )
            ids[name] = int(base[str(token)])
        self._ids = ids
        self._vocab_size = len(tokenizer)
        if self._vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer from {source or '<object>'} has only {self._vocab_size} tokens")

    @classmethod
    def from_path(cls, path: str | Path, *, max_tokens: int, mode: str = "albef") -> TextTokenizer:
        """Load from a vocab.txt file or a folder holding tokenizer.json and/or vocab.txt."""
        from transformers import BertTokenizerFast

        p = Path(path)
        if not str(path):
            raise ValueError("tokenizer path is empty (set data.tokenizer to a vocab.txt file or a folder)")
        if not p.exists():
            raise FileNotFoundError(f"tokenizer path {p} does not exist (expected vocab.txt or a folder)")
        try:
            if p.is_file():
                # transformers 5 takes the file as `vocab=`; `vocab_file=` silently gives an empty vocab.
                tok = BertTokenizerFast(vocab=str(p), do_lower_case=True)
            elif (p / "tokenizer.json").is_file():
                tok = BertTokenizerFast.from_pretrained(str(p), local_files_only=True)
            elif (p / "vocab.txt").is_file():
                tok = BertTokenizerFast(vocab=str(p / "vocab.txt"), do_lower_case=True)
            else:
                raise FileNotFoundError(f"tokenizer folder {p} holds neither tokenizer.json nor vocab.txt")
        except (FileNotFoundError, ValueError):
            raise
        except Exception as e:  # malformed JSON / undecodable vocab: name the path
            raise ValueError(f"could not load a BERT tokenizer from {p}: {e}") from e
        out = cls(tok, max_tokens=max_tokens, mode=mode, source=str(p))
        logger.info("tokenizer %s: %d tokens, mode %s, max_tokens %d", p, out.vocab_size, mode, max_tokens)
        return out

    # ------------------------------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_token_id(self) -> int:
        return self._ids["pad"]

    @property
    def cls_token_id(self) -> int:
        return self._ids["cls"]

    @property
    def sep_token_id(self) -> int:
        return self._ids["sep"]

    @property
    def mask_token_id(self) -> int:
        return self._ids["mask"]

    @property
    def unk_token_id(self) -> int:
        return self._ids["unk"]

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    def with_max_tokens(self, max_tokens: int) -> TextTokenizer:
        """The same vocabulary and mode with another length cap (VQA's evaluation questions are longer)."""
        return TextTokenizer(self._tok, max_tokens=max_tokens, mode=self._mode, source=self._source)

    # ------------------------------------------------------------------------------------------- encoding
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text with the mode's special tokens, each row at most max_tokens long."""
        if isinstance(texts, str):
            raise TypeError("TextTokenizer expects a list of strings, got a single str")
        if not texts:
            return []
        # Tokenise without special tokens and add them ourselves: the post-processor of a loaded tokenizer
        # always appends [SEP], and truncation must reserve room for exactly the specials of our mode.
        pieces = self._tok(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        cls_id, sep_id = self.cls_token_id, self.sep_token_id
        if self._mode == "albef":
            room = self._max_tokens - 1
            return [[cls_id, *p[:room]] for p in pieces]
        room = self._max_tokens - 2
        return [[cls_id, *p[:room], sep_id] for p in pieces]

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        rows = self.encode(texts)
        length = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(rows), length), dtype=torch.long)  # [B, L], 1 on real tokens
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(source={self._source!r}, vocab_size={self._vocab_size}, mode={self._mode!r}, "
            f"max_tokens={self._max_tokens})"
        )
