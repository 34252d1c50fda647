"""A MiniMind model as one GGUF file for llama.cpp and Ollama, and an independent numpy forward over such a file.

    python export_model.py --ckpt out/full_sft_512.pth --format gguf --out_dir out/MiniMind-v1-small-gguf
    python export_model.py --ckpt out/full_sft_512.pth --format gguf --dtype q8_0 --out_dir out/MiniMind-v1-q8
    llama-cli -m out/MiniMind-v1-small-gguf/MiniMind-v1-small-gguf-F32.gguf --jinja
    ollama create minimind -f out/MiniMind-v1-small-gguf/Modelfile

The file is written with llama.cpp's own `gguf` package, in the layout its converter (convert_hf_to_gguf.py)
produces for the matching transformers model:
- MiniMind v1 (dense) is llama.cpp's `llama` architecture. That architecture ropes with GGML's "normal" type, which
  rotates adjacent pairs (x[2i], x[2i+1]), exactly as v1 does, so q and k go in unchanged. (The converter permutes
  HF Llama's rotate-half rows back into this order; export_model.rotate_half_order is the opposite permutation, and
  the tests show that rows in that order give other logits.) MiniMind v1-MoE has a shared expert, which the
  `llama` architecture cannot express: it is refused (a v1 MoE model without one, renormalised top-k, is the
  Mixtral-style routing `llama` runs, and exports with its experts stacked).
- The MiniMind-3 family is `qwen3` (dense) or `qwen3moe` (routed experts stacked per layer, softmax router,
  renormalised top-k, no shared expert): rotate-half RoPE ("neox" in GGML) and per-head q/k RMSNorm, as ours.
- The tokenizer is our byte-level BPE as llama.cpp's `gpt2` model with the `gpt-2` pre-tokenizer, whose split
  regex is the one our ByteLevel pre-tokenizer applies; special tokens are control tokens, BOS is not added (the
  chat template writes it), and the chat template travels as tokenizer.chat_template.
- The tied output projection is not stored: llama.cpp uses token_embd when `output` is absent.
- Norms and the MoE router stay float32 at every --dtype (as the converter does); q8_0 falls back to f16 for a
  matrix whose rows are not a multiple of the 32-value block.

`numpy_logits` reads a GGUF file back with gguf.GGUFReader and computes its logits with numpy alone, from the
tensors and metadata in the file, following llama.cpp's graph for these architectures: it checks the layout
without llama.cpp and without our model code. export_model.py runs it before the folder appears.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError
from .LMConfig import LMConfig
from .minimind3_format import state_dict_from_minimind3, state_dict_to_minimind3

# --dtype name -> the GGML type of the weight matrices
DTYPE_NAMES = ("float32", "float16", "bfloat16", "q8_0")
FILE_LABELS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}  # llama.cpp's file names
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split regex, which is what ByteLevel(use_regex=True) uses
# The same regex written out, under the key Ollama's own llama implementation reads it from (its default there is
# Llama 3's). Ollama's qwen3 implementation has Qwen2's regex built in and reads no key: see the README.
GPT2_SPLIT_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class GGUFExportError(UsageError):
    """A model or flag that the GGUF format cannot hold; the message says why and what to use instead."""


def _gguf():
    """The gguf package, or a clear error: it is only needed for this format."""
    try:
        import gguf
    except ImportError as err:
        raise GGUFExportError("--format gguf needs the gguf package: pip install gguf") from err
    return gguf


def ggml_type(dtype_name: str):
    gguf = _gguf()
    types = {"float32": gguf.GGMLQuantizationType.F32, "float16": gguf.GGMLQuantizationType.F16,
             "bfloat16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    if dtype_name not in types:
        raise GGUFExportError(f"--dtype {dtype_name}: a GGUF export takes one of {', '.join(DTYPE_NAMES)}")
    return types[dtype_name]


def gguf_arch(config: LMConfig) -> str:
    """llama.cpp's architecture for this model; GGUFExportError when none of them computes what it computes."""
    family = config.qk_norm and config.rope_layout == "half"
    if not family and (config.qk_norm or config.rope_layout != "interleaved"):
        raise GGUFExportError("--format gguf: a model with only one of QK-norm and rotate-half RoPE matches no "
                              "llama.cpp architecture; export it with --format minimind")
    if config.yarn:
        raise GGUFExportError("--format gguf does not carry YaRN (llama.cpp's YaRN also scales attention by "
                              "1 + 0.1 ln(factor), MiniMind-3's does not, and this pairing is unverified); export the "
                              "model without it (drop \"yarn\" from the checkpoint's .json) and pass llama.cpp "
                              "--rope-scaling yarn at run time if you need the long context")
    if config.use_moe:
        if config.n_shared_experts:
            raise GGUFExportError("--format gguf: this MoE model has a shared expert (MiniMind v1-MoE), which "
                                  "llama.cpp's llama architecture cannot express; use --format minimind "
                                  "(transformers, trust_remote_code) for MoE v1 models")
        if not config.norm_topk_prob and config.num_experts_per_tok > 1:
            raise GGUFExportError("--format gguf: llama.cpp renormalises the top-k routing weights and this "
                                  "model (norm_topk_prob False) does not; use --format minimind")
    if not family:
        return "llama"
    return "qwen3moe" if config.use_moe else "qwen3"


# ----------------------------------------------------------------------------------------------------------------
# tensors


def keeps_float32(hf_name: str, array: np.ndarray) -> bool:
    """Norms (1-D) and the MoE router stay float32 whatever --dtype says: they are tiny, and rounding the router
    can change which expert a token goes to."""
    return array.ndim == 1 or hf_name.endswith(".mlp.gate.weight")


def stored_type(hf_name: str, array: np.ndarray, wanted):
    """The GGML type a tensor is written in: `wanted`, or float32 (see keeps_float32), or f16 where Q8_0's
    32-value blocks do not divide the rows."""
    gguf = _gguf()
    if keeps_float32(hf_name, array):
        return gguf.GGMLQuantizationType.F32
    if wanted == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0]:
        return gguf.GGMLQuantizationType.F16
    return wanted


def round_as_stored(hf_name: str, array: np.ndarray, wanted) -> np.ndarray:
    """The float32 values llama.cpp reads back for this tensor."""
    gguf = _gguf()
    qtype = stored_type(hf_name, array, wanted)
    return gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).reshape(array.shape)


def transformers_named(model) -> dict[str, np.ndarray]:
    """Our weights as float32 numpy under transformers' Llama/Qwen3 names (the mapping the qwen3 export uses: the
    two share every name a MiniMind model has), each layer's experts stacked into one (experts, out, in) tensor
    named `...mlp.experts.{proj}.weight` as llama.cpp's converter merges them."""
    config = model.config
    named = state_dict_to_minimind3(model.state_dict(), config)
    out = {k: v.float().numpy() for k, v in named.items() if ".mlp.experts." not in k}
    if config.use_moe:
        for i in range(config.n_layers):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                experts = [named[f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"].float().numpy()
                           for j in range(config.n_routed_experts)]
                out[f"model.layers.{i}.mlp.experts.{proj}.weight"] = np.stack(experts)
    return out


def gguf_tensors(model, arch: str) -> list[tuple[str, str, np.ndarray]]:
    """(llama.cpp name, transformers name, float32 array) for every tensor the file holds, named by gguf's own
    tensor map for `arch`."""
    gguf = _gguf()
    arch_id = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(arch_id, model.config.n_layers)
    out = []
    for hf_name, array in transformers_named(model).items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise KeyError(f"llama.cpp's {arch} architecture has no tensor for {hf_name}")
        out.append((name, hf_name, array))
    return out


def rounded_model(model, dtype_name: str):
    """A copy of `model` whose weights are rounded as the GGUF file stores them, so a comparison with the file
    measures the conversion, not the rounding."""
    wanted = ggml_type(dtype_name)
    named = state_dict_to_minimind3(model.state_dict(), model.config)
    rounded = {k: torch.from_numpy(round_as_stored(k, v.float().numpy(), wanted)) for k, v in named.items()}
    copy_ = copy.deepcopy(model).float().eval()
    copy_.load_state_dict(state_dict_from_minimind3(rounded, model.config), strict=True)
    return copy_


# ----------------------------------------------------------------------------------------------------------------
# metadata


def add_hyperparameters(writer, config: LMConfig, arch: str) -> None:
    """The `{arch}.*` keys llama.cpp reads the model's shape, norms, RoPE and experts from."""
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_vocab_size(config.vocab_size)
    # llama's MoE reads the experts' width from feed_forward_length; qwen3moe from expert_feed_forward_length.
    ffn = config.expert_hidden_dim if config.use_moe and arch == "llama" else config.ffn_hidden_dim
    writer.add_feed_forward_length(ffn)
    if config.use_moe:
        writer.add_expert_count(config.n_routed_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.expert_hidden_dim)
    if config.rope_scaling_factor:  # ours divides positions by the factor: GGML's linear scaling
        gguf = _gguf()
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling_factor))


def add_tokenizer(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    """Our byte-level BPE as llama.cpp's gpt2 tokenizer: tokens by id, their types, merges, special ids, chat
    template and add_bos/add_eos (both false: the chat template writes the markers itself)."""
    gguf = _gguf()
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    if (spec["model"]["type"] != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True)
            or pre.get("add_prefix_space") or spec.get("normalizer")):
        raise GGUFExportError(f"{tokenizer_dir}/tokenizer.json: only a byte-level BPE tokenizer with GPT-2's split "
                              "regex, no prefix space and no normalizer (what train_tokenizer.py makes) has a "
                              "llama.cpp equivalent; pass such a tokenizer with --tokenizer_dir")
    vocab = spec["model"]["vocab"]
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for token in spec.get("added_tokens", []):
        vocab.setdefault(token["content"], token["id"])
    if len(vocab) > vocab_size:
        raise GGUFExportError(f"{tokenizer_dir}: the tokenizer has {len(vocab)} tokens, the model only "
                              f"{vocab_size}; pass the tokenizer the model was trained with (--tokenizer_dir)")
    by_id = {i: token for token, i in vocab.items()}
    # Ids the tokenizer does not use (a vocabulary padded for the model) are unused placeholders, as the converter
    # writes them.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if i in specials else
             gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_string("tokenizer.ggml.pretokenizer", GPT2_SPLIT_REGEX)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)


# ----------------------------------------------------------------------------------------------------------------
# writing


def write_gguf(model, path: Path, dtype_name: str, tokenizer_dir: Path, name: str = "MiniMind") -> Path:
    """Write `model` as one GGUF file at `path` (the caller makes it atomic: export_model writes a temp folder)."""
    gguf = _gguf()
    config = model.config
    arch = gguf_arch(config)
    wanted = ggml_type(dtype_name)
    file_types = {gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
                  gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
                  gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
                  gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
    writer = gguf.GGUFWriter(path, arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(file_types[wanted])
        if wanted == gguf.GGMLQuantizationType.Q8_0:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, config, arch)
        add_tokenizer(writer, Path(tokenizer_dir), config.vocab_size)
        for gguf_name, hf_name, array in gguf_tensors(model, arch):
            qtype = stored_type(hf_name, array, wanted)
            data = gguf.quants.quantize(np.ascontiguousarray(array), qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


# Ollama's TEMPLATE is a Go text/template over .Messages; each reproduces the family's chat template for system,
# user and assistant turns (an assistant turn of MiniMind-3 with its empty reasoning block, thinking off).
OLLAMA_V1 = """{{- range $i, $m := .Messages }}
{{- if eq $m.Role "system" }}{{ if eq $i 0 }}{{ $m.Content }}{{ end }}
{{- else if eq $m.Role "user" }}<s>user
{{ $m.Content }}</s>
<s>assistant
{{ else if eq $m.Role "assistant" }}{{ $m.Content }}</s>
{{ end }}
{{- end }}"""
OLLAMA_CHATML = """{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "assistant" }}<|im_start|>assistant
<think>

</think>

{{ $m.Content }}<|im_end|>
{{ else }}<|im_start|>{{ $m.Role }}
{{ $m.Content }}<|im_end|>
{{ end }}
{{- if and $last (ne $m.Role "assistant") }}<|im_start|>assistant
<think>

</think>

{{ end }}
{{- end }}"""


def modelfile_text(gguf_file: str, config: LMConfig) -> str:
    """An Ollama Modelfile for the file beside it: the template and stop tokens of the model's family."""
    chatml = config.qk_norm and config.rope_layout == "half"
    template, stops = (OLLAMA_CHATML, ["<|im_end|>", "<|endoftext|>"]) if chatml else (OLLAMA_V1, ["</s>"])
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines.append(f"PARAMETER num_ctx {config.context_length}")
    return "\n".join(lines) + "\n"


def write_gguf_folder(model, folder: Path, dtype_name: str, tokenizer_dir: Path, name: str) -> Path:
    """`{name}-{TYPE}.gguf` and an Ollama `Modelfile` in `folder`; returns the GGUF path."""
    gguf_file = f"{name}-{FILE_LABELS[dtype_name]}.gguf"
    path = write_gguf(model, folder / gguf_file, dtype_name, tokenizer_dir, name=name)
    (folder / "Modelfile").write_text(modelfile_text(gguf_file, model.config), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# reading back: a numpy forward that follows llama.cpp's graph, from the file alone


@dataclass
class GGUFContents:
    """A GGUF file as read back: metadata by key, tensors by name (float32, numpy's (rows..., columns) order) and
    each tensor's stored GGML type and GGML shape (fastest dimension first)."""

    meta: dict
    tensors: dict[str, np.ndarray]
    types: dict
    shapes: dict[str, tuple[int, ...]]


def read_gguf(path: Path) -> GGUFContents:
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors, types, shapes = {}, {}, {}
    for t in reader.tensors:
        shapes[t.name] = tuple(int(n) for n in t.shape)
        types[t.name] = t.tensor_type
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(values, dtype=np.float32).reshape(shapes[t.name][::-1])
    return GGUFContents(meta, tensors, types, shapes)


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, positions: np.ndarray, base: float, scale: float, neox: bool) -> np.ndarray:
    """GGML's RoPE on (T, heads, head_dim): "normal" rotates (x[2i], x[2i+1]), "neox" rotates (x[i], x[i+d/2])."""
    d = x.shape[-1]
    angles = (positions[:, None] * scale) * base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(np.float32)
    a, b = x[..., 0::2], x[..., 1::2]
    return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape).astype(np.float32)


def _attention(h: np.ndarray, t: dict, i: int, hp: dict) -> np.ndarray:
    T = h.shape[0]
    n_head, n_kv, d = hp["n_head"], hp["n_kv"], hp["head_dim"]
    q = (h @ t[f"blk.{i}.attn_q.weight"].T).reshape(T, n_head, d)
    k = (h @ t[f"blk.{i}.attn_k.weight"].T).reshape(T, n_kv, d)
    v = (h @ t[f"blk.{i}.attn_v.weight"].T).reshape(T, n_kv, d)
    if f"blk.{i}.attn_q_norm.weight" in t:  # qwen3: per-head RMSNorm before RoPE
        q = _rms_norm(q, t[f"blk.{i}.attn_q_norm.weight"], hp["eps"])
        k = _rms_norm(k, t[f"blk.{i}.attn_k_norm.weight"], hp["eps"])
    positions = np.arange(T, dtype=np.float64)
    q = _rope(q, positions, hp["base"], hp["pos_scale"], hp["neox"])
    k = _rope(k, positions, hp["base"], hp["pos_scale"], hp["neox"])
    group = n_head // n_kv  # query head j reads kv head j // group, as GGML's broadcast does
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, v).reshape(T, n_head * d)
    return out @ t[f"blk.{i}.attn_output.weight"].T


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _feed_forward(h: np.ndarray, t: dict, i: int, hp: dict) -> np.ndarray:
    p = f"blk.{i}."
    if p + "ffn_gate_inp.weight" not in t:
        return (_silu(h @ t[p + "ffn_gate.weight"].T) * (h @ t[p + "ffn_up.weight"].T)) @ t[p + "ffn_down.weight"].T
    # MoE: softmax over the router's logits, the top k, their weights renormalised to sum to 1
    logits = h @ t[p + "ffn_gate_inp.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, : hp["n_expert_used"]]
    weights = np.take_along_axis(probs, chosen, -1)
    weights /= weights.sum(-1, keepdims=True)
    out = np.zeros_like(h)
    gate, up, down = t[p + "ffn_gate_exps.weight"], t[p + "ffn_up_exps.weight"], t[p + "ffn_down_exps.weight"]
    for row in range(h.shape[0]):
        for e, w in zip(chosen[row], weights[row]):
            x = h[row]
            out[row] += w * ((_silu(gate[e] @ x) * (up[e] @ x)) @ down[e].T)
    return out


def hyperparameters(meta: dict) -> dict:
    """What the forward needs, read from the file's metadata only."""
    arch = meta["general.architecture"]
    hp = {"arch": arch, "n_layer": int(meta[f"{arch}.block_count"]), "n_head": int(meta[f"{arch}.attention.head_count"]),
          "n_kv": int(meta[f"{arch}.attention.head_count_kv"]), "eps": float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
          "base": float(meta[f"{arch}.rope.freq_base"]), "neox": arch in ("qwen3", "qwen3moe"),
          "n_expert_used": int(meta.get(f"{arch}.expert_used_count", 0))}
    hp["head_dim"] = int(meta.get(f"{arch}.attention.key_length",
                                  int(meta[f"{arch}.embedding_length"]) // hp["n_head"]))
    linear = meta.get(f"{arch}.rope.scaling.type") == "linear"
    hp["pos_scale"] = 1.0 / float(meta[f"{arch}.rope.scaling.factor"]) if linear else 1.0
    return hp


def numpy_logits(contents: GGUFContents, ids) -> np.ndarray:
    """(T, vocab) float32 logits of a GGUF model (see read_gguf) for one sequence of token ids (positions 0..T-1)."""
    t, hp = contents.tensors, hyperparameters(contents.meta)
    x = t["token_embd.weight"][np.asarray(ids)]
    for i in range(hp["n_layer"]):
        x = x + _attention(_rms_norm(x, t[f"blk.{i}.attn_norm.weight"], hp["eps"]), t, i, hp)
        x = x + _feed_forward(_rms_norm(x, t[f"blk.{i}.ffn_norm.weight"], hp["eps"]), t, i, hp)
    x = _rms_norm(x, t["output_norm.weight"], hp["eps"])
    return (x @ t.get("output.weight", t["token_embd.weight"]).T).astype(np.float32)


@torch.inference_mode()
def compare_with_model(path: Path, model, dtype_name: str, length: int = 16, seed: int = 0) -> tuple[float, float]:
    """(max |numpy logits of the file - our logits|, max |logit|) on random ids, with our model rounded as the
    file stores it."""
    reference = rounded_model(model, dtype_name)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (min(length, model.config.context_length),), generator=g)
    ours = reference(ids[None]).logits[0].numpy()
    theirs = numpy_logits(read_gguf(path), ids.numpy())
    return float(np.abs(ours - theirs).max()), float(np.abs(ours).max())
