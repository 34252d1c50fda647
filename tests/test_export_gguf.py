"""export_model.py --format gguf: the file holds llama.cpp's architecture, tensor names, layout and tokenizer.

Two independent proofs. CI: the file is read back with gguf.GGUFReader and a numpy forward written from llama.cpp's
graph (RoPE "normal" pairs for llama, "neox" halves plus q/k norm for qwen3, GQA, SwiGLU, softmax top-k experts)
gives our model's logits. Where llama-cpp-python is installed (it is not in requirements.txt: its source build
outlasts CI), llama.cpp itself loads the file: its tokenizer gives our ids and its greedy tokens are our engine's.
"""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_export_qwen3 import family_model

import export_model
from model import gguf_export
from model.checkpoint import TOKENIZER3_DIR, TOKENIZER_DIR, load_tokenizer, save_weights
from model.generate import generate

CASES = {
    # v1 dense; 64 positions so that prompt + 32 new tokens stay inside the context (our engine would slide)
    "v1": lambda: tiny_model(vocab_size=6400, max_seq_len=64),
    "v1-linear-rope": lambda: tiny_model(vocab_size=6400, max_seq_len=32, rope_scaling_factor=2.0),
    # MoE v1 without the shared expert is Mixtral-style routing, which llama.cpp's llama architecture runs
    "v1-moe-unshared": lambda: tiny_model(vocab_size=6400, max_seq_len=64, use_moe=True, n_shared_experts=False),
    "minimind3": lambda: family_model("dense"),
    "minimind3-moe": lambda: family_model("moe"),
}
ARCH = {"v1": "llama", "v1-linear-rope": "llama", "v1-moe-unshared": "llama", "minimind3": "qwen3",
        "minimind3-moe": "qwen3moe"}
PROMPT = [1, 5, 9, 200, 31, 7, 100, 2000]
TEXTS = ["Hello, 世界! 🌍 It's 2024年... \n\n  spaces   and\ttabs 你好吗？ don't  \n end  ",
         "I'M  you'RE they've 12345678 3.14159 -42 x=y+z; print('hi')\n\n\n\t\t  \n",
         "👨‍👩‍👧‍👦 🇨🇳 नमस्ते café naïve Ελληνικά русский 日本語のテキスト 한국어 ½ ² ① 〇",
         "   leading and trailing   ", "def f(x):\n    return x**2  # 注释\n"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """export(case, dtype) -> (model, GGUF path), each exported once per module (unverified: the tests check)."""
    cache = {}

    def export(case: str, dtype: str = "float32"):
        if (case, dtype) not in cache:
            out = tmp_path_factory.mktemp("gguf") / f"{case}-{dtype}"
            cache[case, dtype] = models(case), export_model.export_gguf(models(case), out, dtype, verify=False)
        return cache[case, dtype]

    return export


@pytest.fixture(scope="module")
def read_back(exported):
    """read_back(case, dtype) -> (model, GGUFContents), the file read once per module (the reader takes ~0.5 s)."""
    cache = {}

    def read(case: str, dtype: str = "float32"):
        if (case, dtype) not in cache:
            model, path = exported(case, dtype)
            cache[case, dtype] = model, gguf_export.read_gguf(path)
        return cache[case, dtype]

    return read


_MODELS, _GREEDY = {}, {}


def models(case: str):
    if case not in _MODELS:
        _MODELS[case] = CASES[case]()
    return _MODELS[case]


def our_greedy(case: str, n: int = 32) -> list[int]:
    """Our engine's greedy tokens after PROMPT (the first n of 32, computed once per case)."""
    if case not in _GREEDY:
        _GREEDY[case] = generate(models(case), [PROMPT], temperature=0, max_new_tokens=32)[0]
    return _GREEDY[case][:n]


@torch.inference_mode()
def our_logits(model, ids) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].numpy()


def tolerance(scale: float, dtype: str) -> float:
    """fp32 rounding differences grow with the logits; f16 weights move them by ~1e-3 of their size."""
    return (1e-5 if dtype == "float32" else 5e-3) * max(10.0, scale)


def test_cli_writes_a_verified_gguf_and_modelfile(tmp_path, capsys):
    model = models("v1")
    ckpt = save_weights(model.state_dict(), tmp_path / "full_sft_64.pth", model.config)
    out = tmp_path / "MiniMind-gguf"
    assert export_model.main(["--ckpt", str(ckpt), "--out_dir", str(out), "--format", "gguf"]) == 0
    log = capsys.readouterr().out
    assert "verified: max |logits difference|" in log and "ollama create" in log
    assert sorted(p.name for p in out.iterdir()) == ["MiniMind-gguf-F32.gguf", "Modelfile"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MiniMind-gguf", "full_sft_64.json", "full_sft_64.pth"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./MiniMind-gguf-F32.gguf\n")
    assert 'PARAMETER stop "</s>"' in modelfile and "PARAMETER num_ctx 64" in modelfile
    # an existing export is only replaced with --force
    assert export_model.main(["--ckpt", str(ckpt), "--out_dir", str(out), "--format", "gguf"]) == 1
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("case,dtype", [("v1", "float16"), ("minimind3", "float32"), ("minimind3-moe", "q8_0")])
def test_metadata_names_shapes_and_types(read_back, case, dtype):
    import gguf

    model, contents = read_back(case, dtype)
    c, meta, arch = model.config, contents.meta, ARCH[case]
    assert meta["general.architecture"] == arch
    assert (meta[f"{arch}.block_count"], meta[f"{arch}.embedding_length"]) == (c.n_layers, c.dim)
    assert (meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]) == (c.n_heads, c.n_kv_heads)
    assert meta[f"{arch}.context_length"] == c.context_length and meta[f"{arch}.rope.freq_base"] == c.rope_theta
    # the tokenizer: gpt2 BPE, GPT-2's split regex, our tokens, merges and specials; BOS comes from the template
    tokenizer = json.loads(((TOKENIZER3_DIR if c.qk_norm else TOKENIZER_DIR) / "tokenizer.json").read_text())
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert meta["tokenizer.ggml.tokens"][:3] == [t["content"] for t in tokenizer["added_tokens"][:3]]
    assert len(meta["tokenizer.ggml.merges"]) == len(tokenizer["model"]["merges"])
    control = [i for i, t in enumerate(meta["tokenizer.ggml.token_type"]) if t == gguf.TokenType.CONTROL]
    assert control == [t["id"] for t in tokenizer["added_tokens"]]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    # the split regex written out (for Ollama) splits text exactly as our ByteLevel pre-tokenizer does
    import regex
    from tokenizers import pre_tokenizers

    ours = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in TEXTS:
        pieces = [text[a:b] for _, (a, b) in ours.pre_tokenize_str(text)]
        assert regex.findall(meta["tokenizer.ggml.pretokenizer"], text) == pieces
    assert meta["tokenizer.chat_template"] == load_tokenizer(TOKENIZER3_DIR if c.qk_norm else TOKENIZER_DIR).chat_template

    per_layer = {"attn_norm": (c.dim,), "ffn_norm": (c.dim,), "attn_q": (c.dim, c.n_heads * c.head_dim),
                 "attn_k": (c.dim, c.n_kv_heads * c.head_dim), "attn_v": (c.dim, c.n_kv_heads * c.head_dim),
                 "attn_output": (c.n_heads * c.head_dim, c.dim)}
    if c.qk_norm:
        per_layer.update(attn_q_norm=(c.head_dim,), attn_k_norm=(c.head_dim,))
    if c.use_moe:
        E, h = c.n_routed_experts, c.expert_hidden_dim
        per_layer.update(ffn_gate_inp=(c.dim, E), ffn_gate_exps=(c.dim, h, E), ffn_up_exps=(c.dim, h, E),
                         ffn_down_exps=(h, c.dim, E))
    else:
        per_layer.update(ffn_gate=(c.dim, c.ffn_hidden_dim), ffn_up=(c.dim, c.ffn_hidden_dim),
                         ffn_down=(c.ffn_hidden_dim, c.dim))
    expected = {"token_embd.weight": (c.dim, c.vocab_size), "output_norm.weight": (c.dim,)}  # output: tied
    expected |= {f"blk.{i}.{name}.weight": shape for i in range(c.n_layers) for name, shape in per_layer.items()}
    assert contents.shapes == expected
    wanted = gguf_export.ggml_type(dtype)
    for name, shape in expected.items():
        float32 = len(shape) == 1 or "ffn_gate_inp" in name
        assert contents.types[name] == (gguf.GGMLQuantizationType.F32 if float32 else wanted), name


@pytest.mark.parametrize("case", list(CASES))
def test_numpy_forward_over_the_file_gives_our_logits(read_back, case):
    model, contents = read_back(case)
    ours = our_logits(model, PROMPT)
    theirs = gguf_export.numpy_logits(contents, PROMPT)
    scale = float(np.abs(ours).max())
    assert np.abs(ours - theirs).max() <= tolerance(scale, "float32")
    assert scale > 5  # decisive logits: the comparison is not between two near-zero outputs


@pytest.mark.parametrize("case", ["v1", "minimind3-moe"])
def test_numpy_forward_at_f16_and_q8_0(read_back, case):
    model = models(case)
    ours = our_logits(model, PROMPT)
    f16 = gguf_export.numpy_logits(read_back(case, "float16")[1], PROMPT)
    assert np.abs(ours - f16).max() <= tolerance(float(np.abs(ours).max()), "float16")
    q8 = gguf_export.numpy_logits(read_back(case, "q8_0")[1], PROMPT)
    # exactly our model with its weights rounded through Q8_0 blocks: the quantized layout is right ...
    rounded = our_logits(gguf_export.rounded_model(model, "q8_0"), PROMPT)
    assert np.abs(rounded - q8).max() <= tolerance(float(np.abs(rounded).max()), "float32")
    # ... and the rounding keeps the top token wherever ours leads by more than the rounding moves logits
    top2 = np.sort(ours, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 2 * np.abs(q8 - ours).max(-1)
    assert decisive.sum() >= 3 and (q8.argmax(-1) == ours.argmax(-1))[decisive].all()


def test_v1_rows_go_in_unpermuted(read_back):
    """llama.cpp's llama architecture rotates adjacent pairs, as v1 does; q/k rows in HF Llama's rotate-half order
    (what --format llama writes) compute something else, so the forward does check the layout."""
    model, contents = read_back("v1")
    c = model.config
    permuted = dict(contents.tensors)
    for i in range(c.n_layers):
        for name, heads in (("attn_q", c.n_heads), ("attn_k", c.n_kv_heads)):
            key = f"blk.{i}.{name}.weight"
            rows = torch.from_numpy(permuted[key].copy())
            permuted[key] = export_model.rotate_half_order(rows, heads, c.head_dim).numpy()
    wrong = gguf_export.numpy_logits(gguf_export.GGUFContents(contents.meta, permuted, {}, {}), PROMPT)
    assert np.abs(wrong - our_logits(model, PROMPT)).max() > 1e-2


@pytest.mark.parametrize("flags,message", [
    (dict(use_moe=True), "shared expert"),
    (dict(max_seq_len=16, rope_layout="half", qk_norm=True, max_position_embeddings=64,
          yarn=dict(factor=4.0, original_max_position_embeddings=16)), "YaRN"),
])
def test_models_llama_cpp_cannot_express_are_refused(tmp_path, capsys, flags, message):
    model = tiny_model(vocab_size=6400, **flags)
    ckpt = save_weights(model.state_dict(), tmp_path / "m.pth", model.config)
    code = export_model.main(["--ckpt", str(ckpt), "--out_dir", str(tmp_path / "o"), "--format", "gguf"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "--format" in err and not (tmp_path / "o").exists()


def test_q8_0_is_for_gguf_only(tmp_path, capsys):
    model = tiny_model(vocab_size=6400)
    ckpt = save_weights(model.state_dict(), tmp_path / "m.pth", model.config)
    code = export_model.main(["--ckpt", str(ckpt), "--out_dir", str(tmp_path / "o"), "--dtype", "q8_0"])
    assert code == 1 and "--format gguf" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt,case,architecture", [("llama", "v1", "LlamaForCausalLM"),
                                                   ("qwen3", "minimind3", "Qwen3ForCausalLM"),
                                                   ("qwen3", "minimind3-moe", "Qwen3MoeForCausalLM")])
def test_exported_folders_have_what_vllm_reads(tmp_path, fmt, case, architecture):
    """scripts/check_vllm.sh serves these folders: vLLM picks its model class by config.json's `architectures`
    (names it registers), its dtype from torch_dtype/dtype, and the chat template from the tokenizer config."""
    from transformers import AutoConfig

    out = export_model.export(models(case), tmp_path / fmt, fmt, torch.bfloat16, verify=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture] and "auto_map" not in config
    assert (config.get("torch_dtype") or config.get("dtype")) == "bfloat16"
    assert AutoConfig.from_pretrained(out).architectures == [architecture]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python; skipped where it is not installed)


def llama(path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp")
    # float32 KV cache: the default f16 cache alone moves logits by ~1e-3 of their size
    return llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=1, type_k=0, type_v=0, **kwargs)


def llama_cpp_greedy(llm, prompt, n: int, eos: int = 2) -> list[int]:
    out = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if token == eos or len(out) == n:
            return out
    return out


@pytest.mark.parametrize("case,tokenizer_dir", [("v1", TOKENIZER_DIR), ("minimind3", TOKENIZER3_DIR)])
def test_llama_cpp_tokenizes_like_ours(exported, case, tokenizer_dir):
    ours = load_tokenizer(tokenizer_dir)
    chat = ours.apply_chat_template([{"role": "system", "content": "你是助手"}, {"role": "user", "content": "hi 你好"},
                                     {"role": "assistant", "content": "好的!"}, {"role": "user", "content": "1+1=?"}],
                                    tokenize=False, add_generation_prompt=True)
    llm = llama(exported(case)[1], vocab_only=True)
    try:
        for text in [*TEXTS, chat]:  # the chat text has the template's special tokens in it
            ids = ours(text, add_special_tokens=False).input_ids
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text  # add_bos: the file says no
            assert llm.detokenize(ids, special=True).decode() == text
        assert (llm.token_bos(), llm.token_eos()) == (ours.bos_token_id, ours.eos_token_id)
    finally:
        llm.close()


@pytest.mark.parametrize("case,dtype,greedy", [
    ("v1", "float32", True), ("v1", "float16", True), ("minimind3", "float32", True), ("minimind3", "float16", True),
    ("minimind3-moe", "float32", True), ("v1-linear-rope", "float32", False), ("v1-moe-unshared", "float32", False),
])
def test_llama_cpp_gives_our_logits_and_greedy_tokens(exported, case, dtype, greedy):
    model, path = exported(case, dtype)
    llm = llama(path, n_ctx=64, logits_all=True)
    try:
        llm.eval(PROMPT)
        theirs, ours = np.array(llm.scores[: len(PROMPT)]), our_logits(model, PROMPT)
        assert np.abs(theirs - ours).max() <= tolerance(float(np.abs(ours).max()), dtype)
        # greedy decoding is checked on each architecture once; for linear RoPE and the v1-style MoE the logits
        # already show the math, and a 32-token run would only add seconds
        if greedy:
            want = our_greedy(case)
            assert len(want) == 32 and len(set(want)) > 4  # 32 varied tokens: not a constant sequence
            llm.reset()
            assert llama_cpp_greedy(llm, PROMPT, 32) == want
    finally:
        llm.close()


@pytest.mark.parametrize("case", ["v1", "minimind3"])
def test_llama_cpp_q8_0_agrees_on_the_first_tokens(exported, case):
    path = exported(case, "q8_0")[1]
    llm = llama(path, n_ctx=64)
    try:
        assert llama_cpp_greedy(llm, PROMPT, 4) == our_greedy(case, 4)
    finally:
        llm.close()


def test_llama_cpp_chat_uses_the_template_in_the_file(exported):
    """llama-cpp-python's chat completion renders tokenizer.chat_template from the file: same prompt, same reply."""
    model, path = exported("v1")
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = generate(model, [tokenizer(prompt, add_special_tokens=False).input_ids], temperature=0, max_new_tokens=12)[0]
    llm = llama(path, n_ctx=64)
    try:
        reply = llm.create_chat_completion(messages, max_tokens=12, temperature=0.0, top_k=1, repeat_penalty=1.0)
    finally:
        llm.close()
    # A random model's reply can hold a token that is part of a UTF-8 character: transformers decodes it to U+FFFD,
    # llama.cpp's chat completion leaves it out.
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(want, skip_special_tokens=True).replace(
        "\ufffd", "")
