"""The tokenizer: byte-level BPE (GPT-2's scheme; SmolLM2, Llama 3, Qwen2) run by tiktoken.

Text -> pieces (the pre-tokenizer: a regex per model family) -> bytes -> BPE merges within each
piece -> token ids. A token's id is its merge rank, so tiktoken's rank-ordered merging gives
Hugging Face's result. The vocabulary comes from a GGUF file or a tokenizer.json (checkpoints.py);
`tokenizer_json` writes it back in Hugging Face's format.
Simplified: byte-level BPE only (no SentencePiece, no byte fallback); normalizers: none or NFC.
Demo: `python checkpoints.py --prompt "Hello"` encodes through it.
"""
import json
import unicodedata
from typing import Optional

import tiktoken


# Pre-tokenizer patterns (text -> pieces that BPE merges within). GPT-2's; SmolLM2's: every digit
# is its own piece, and a whitespace run before a digit stays whole (Hugging Face's Digits
# pre-tokenizer before the GPT-2 split); Llama 3's (digits in runs of up to 3) and Qwen2's (single
# digits) come from their tokenizer.json as a Split regex, and by name from GGUF files.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SMOLLM_PATTERN = (r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})"""
                  r"""|\s+(?!\S)|\s+""")
_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|DIGITS"""
          r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_PATTERN = _SPLIT.replace("DIGITS", r"\p{N}{1,3}")
QWEN2_PATTERN = _SPLIT.replace("DIGITS", r"\p{N}")
GGUF_PRETOKENIZERS = {"gpt2": GPT2_PATTERN, "default": GPT2_PATTERN, "smollm": SMOLLM_PATTERN,
                      "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


def pretokenizer_pattern(pre: Optional[dict], where: str) -> str:
    """The regex of a tokenizer.json pre_tokenizer; any other kind is refused, never guessed."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return SMOLLM_PATTERN
    if (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and not steps[1].get("use_regex", True)):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"{where}: pre-tokenizer {json.dumps(pre)[:200]} is not supported (supported: "
                     "GPT-2's ByteLevel, SmolLM2's Digits + ByteLevel, a Split regex + ByteLevel "
                     "as Llama 3 and Qwen2)")


def bytes_to_unicode() -> dict:
    """GPT-2's reversible map byte -> printable character, to write byte-level tokens as text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


class Tokenizer:
    """Byte-level BPE as a tiktoken Encoding: a token's rank is its id: merges follow id order."""

    def __init__(self, tokens, special_ids, merges, pattern, bos_id, eos_id, name="bpe", nfc=False):
        self.tokens, self.merges, self.pattern = tokens, merges, pattern   # for tokenizer.json
        self.nfc = nfc   # Unicode NFC before splitting (Qwen2's normalizer)
        self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, len(tokens)
        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        ranks = {bytes(byte_of[ch] for ch in t): i for i, t in enumerate(tokens)
                 if i not in special_ids}
        self.special = {tokens[i]: i for i in special_ids}
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self._known_bytes = {k[0] for k in ranks if len(k) == 1}

    def encode(self, text: str, allow_special: bool = False) -> list:
        text = unicodedata.normalize("NFC", text) if self.nfc else text
        # A character with a byte that has no token (SmolLM2 lacks a few control bytes) would make
        # tiktoken panic, a BaseException that kills callers. It is dropped and the text is encoded
        # around it, which matches Hugging Face's BPE without an unknown token in nearly all cases.
        bad = {c for c in set(text)
               if "\ud800" <= c <= "\udfff" or not set(c.encode()) <= self._known_bytes}
        if bad:
            parts, start = [], 0
            for i, c in enumerate(text):
                if c in bad:
                    parts, start = parts + [text[start:i]], i + 1
            return [t for part in parts + [text[start:]] for t in self.encode(part, allow_special)]
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode(text, disallowed_special=())   # special-token text is plain text

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids), errors="replace")


class ByteTokenizer:
    """256 byte tokens plus a few specials, for tests and toy models (vocab 259)."""
    SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

    def __init__(self):
        self.special = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self.bos_id, self.eos_id, self.vocab_size = 257, 256, 256 + len(self.SPECIALS)

    def encode(self, text, allow_special=False):
        if not allow_special:
            return list(text.encode())
        ids, rest = [], text
        while rest:
            hits = [(rest.find(s), s) for s in self.SPECIALS if s in rest]
            i, s = min(hits) if hits else (len(rest), "")
            ids += list(rest[:i].encode()) + ([self.special[s]] if s else [])
            rest = rest[i + len(s):]
        return ids

    def decode(self, ids):
        names = {i: s for s, i in self.special.items()}
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode(errors="replace") + names[i])
                buf = bytearray()
        return "".join(out) + buf.decode(errors="replace")


def tokenizer_json(tok: Tokenizer) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    split = {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated",
             "invert": False}
    pre = {GPT2_PATTERN: byte_level, SMOLLM_PATTERN: {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}}.get(tok.pattern, {
            "type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]})
    return {"version": "1.0", "added_tokens": [
                {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for s, i in tok.special.items()],
            "normalizer": {"type": "NFC"} if tok.nfc else None, "pre_tokenizer": pre,
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": {t: i for i, t in enumerate(tok.tokens)},
                      "merges": list(tok.merges)}}


def tokenizer_from_json(t: dict, bos_id, eos_id, where: str) -> "Tokenizer":
    """A Tokenizer from a parsed tokenizer.json; what it cannot reproduce is refused by name."""
    if t["model"].get("type") != "BPE":
        raise ValueError(f"{where}: model type {t['model'].get('type')!r} is not byte-level BPE")
    normalizer = (t.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"{where}: normalizer {normalizer!r} is not supported (none, NFC)")
    vocab = dict(t["model"]["vocab"])
    for added in t.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = [a["id"] for a in t.get("added_tokens", []) if a.get("special")]
    merges = [m if isinstance(m, str) else " ".join(m) for m in t["model"].get("merges", [])]
    eos_id = (specials[0] if specials else 0) if eos_id is None else eos_id
    return Tokenizer(tokens, specials, merges, pretokenizer_pattern(t.get("pre_tokenizer"), where),
                     eos_id if bos_id is None else bos_id, eos_id, nfc=normalizer == "NFC")
