"""Export a `.pth` checkpoint as a transformers model folder (safetensors, config, generation config, tokenizer).

    python export_model.py --ckpt out/full_sft_512.pth --out_dir out/MiniMind-v1-small
    python export_model.py --ckpt out/full_sft_512.pth --format llama --out_dir out/MiniMind-v1-small-llama
    python export_model.py --ckpt out/full_sft_512_moe.pth --out_dir out/MiniMind-v1-moe
    python export_model.py --ckpt out/full_sft_768.pth --dtype bfloat16 --out_dir ...
    python export_model.py --ckpt out/full_sft_512.pth --format gguf --dtype q8_0 --out_dir out/MiniMind-v1-small-gguf

Formats:
- minimind (default): our own model code travels in the folder (LMConfig.py, model.py) and config.json points at it
  through `auto_map`, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it anywhere.
  Dense and MoE.
- llama (dense only): a plain LlamaForCausalLM checkpoint; vanilla transformers loads it without remote code, and so
  do tools that read Llama checkpoints. The math is the same; two things change on the way:
  * names: tok_embeddings -> model.embed_tokens, attention.wq -> self_attn.q_proj, feed_forward.w1 -> mlp.gate_proj,
    w3 -> up_proj, w2 -> down_proj, attention_norm -> input_layernorm, ffn_norm -> post_attention_layernorm, ...
  * RoPE: we rotate adjacent pairs (x[2i], x[2i+1]); HF Llama rotates halves (x[i], x[i + head_dim/2]). Reordering
    each head's q and k projection rows to [0, 2, 4, ..., 1, 3, 5, ...] turns one into the other; q.k is unchanged
    because q and k are reordered alike.

- qwen3 (the MiniMind-3 family, dense or MoE): a native Qwen3ForCausalLM / Qwen3MoeForCausalLM folder, no remote
  code. The family is Qwen3's math (rotate-half RoPE, QK-norm, no shared expert), so only the names change; YaRN
  goes over as transformers' "yarn" rope type with MiniMind-3's attention factor written out.
- minimind3: the MiniMind-3 family in the layout MiniMind-3 publishes its weights in (config.json with
  hidden_size/num_hidden_layers/..., model.safetensors with model.layers.{i}.self_attn.q_proj...), which this
  project's `--ckpt`/`--init` read back with no flags.
- gguf: one GGUF file for llama.cpp (architecture llama for dense v1, qwen3 / qwen3moe for the MiniMind-3 family;
  --dtype float32/float16/bfloat16/q8_0) with our tokenizer and chat template inside, and an Ollama Modelfile beside
  it. v1 MoE (shared expert) and YaRN are refused. See model/gguf_export.py.

Before the folder appears, the export is loaded back through AutoModelForCausalLM (a GGUF file: through the numpy
forward over the file) and its logits are compared with the checkpoint's (--no_verify skips this). The folder is
written under a temporary name and renamed at the end, and an existing non-empty folder is only replaced with
--force. No network access is needed.
"""

from __future__ import annotations

import argparse
import ast
import copy
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from model.checkpoint import DTYPES, PACKAGE_DIR, family_tokenizer_dir, load_model, load_tokenizer, read_checkpoint
from model.LMConfig import LMConfig, add_model_args, model_flags
from model.minimind3_format import check_family, read_minimind3, state_dict_to_minimind3, write_minimind3
from model.model import MiniMindForCausalLM, _active_yarn

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
AUTO_MAP = {"AutoConfig": "LMConfig.LMConfig", "AutoModelForCausalLM": "model.MiniMindForCausalLM"}


# ----------------------------------------------------------------------------------------------------------------
# minimind format: our classes, shipped as remote code


def standalone_source(path: Path) -> tuple[str, list[str]]:
    """The source of one `model/` module as remote code, and the sibling modules it imports.

    transformers copies a remote-code module and the files it imports relatively (`from .LMConfig import ...`) into
    a package of its own, so relative imports keep working. What must go is the registration with the Auto classes:
    run inside another program, it would replace that program's own "minimind" classes. auto_map does that job.
    """
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    siblings, drop = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level > 1:
                raise ValueError(f"{path}: `from {'.' * node.level}{node.module or ''} import` reaches outside the "
                                 "model package; the export cannot ship it")
            siblings += [node.module] if node.module else [alias.name for alias in node.names]
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "register"
                and isinstance(call.func.value, ast.Name) and call.func.value.id.startswith("Auto")):
            drop.update(range(node.lineno, node.end_lineno + 1))
    lines = [line for i, line in enumerate(source.splitlines(keepends=True), 1) if i not in drop]
    note = (f"# Copied from MiniMind's model/{path.name} by export_model.py. The Auto-class registration is left out:\n"
            "# config.json's auto_map tells transformers which classes to use.\n")
    return note + "".join(lines), siblings


def write_model_source(folder: Path, entry: str = "model"):
    """Copy `model/{entry}.py` and every sibling module it needs (recursively) into `folder`."""
    todo, done = [entry], set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        path = PACKAGE_DIR / f"{name}.py"
        if not path.exists():
            raise FileNotFoundError(f"the model code imports .{name}, but {path} does not exist")
        source, siblings = standalone_source(path)
        (folder / path.name).write_text(source, encoding="utf-8")
        todo += siblings


def minimind_files(model, folder: Path, dtype: torch.dtype):
    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["MiniMindForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(folder)
    # output.weight is the embedding (tied); transformers ties it again on load, and safetensors refuses shared storage.
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items() if k != "output.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_model_source(folder)


# ----------------------------------------------------------------------------------------------------------------
# llama format: native LlamaForCausalLM, no remote code


def llama_config(config: LMConfig, dtype: torch.dtype):
    from transformers import LlamaConfig

    if config.qk_norm or config.rope_layout != "interleaved":
        raise ValueError("--format llama is for the v1 family; a MiniMind-3-family model (QK-norm, rotate-half RoPE) "
                         "exports natively with --format qwen3")
    if config.use_moe:
        raise ValueError("--format llama exports dense models only: Llama has no mixture-of-experts layers. "
                         "Export MoE checkpoints with --format minimind (loaded with trust_remote_code=True).")
    rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if config.rope_scaling_factor:
        # Our linear scaling divides positions by the factor, which is exactly HF's "linear" rope type.
        rope = {"rope_type": "linear", "factor": float(config.rope_scaling_factor), "rope_theta": float(config.rope_theta)}
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers 5.x
        rope_fields = {"rope_parameters": rope}
    else:  # 4.x: theta and scaling are separate fields
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if config.rope_scaling_factor else None
        rope_fields = {"rope_theta": rope["rope_theta"], "rope_scaling": scaling}
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        **rope_fields,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
    )


def rotate_half_order(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's output rows from interleaved pairs to halves: rows [0, 2, 4, ..., 1, 3, 5, ...]."""
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return weight.view(n_heads, head_dim, -1)[:, perm].reshape(weight.shape)


LLAMA_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def llama_state_dict(state: dict[str, torch.Tensor], config: LMConfig) -> dict[str, torch.Tensor]:
    """Our v1 state dict under LlamaForCausalLM's names, with q/k rows in rotate-half order (lm_head stays tied)."""
    out = {}
    for key, value in state.items():
        if key == "output.weight":
            continue  # tied to the embedding
        if key == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = value
            continue
        if key == "norm.weight":
            out["model.norm.weight"] = value
            continue
        parts = key.split(".")  # layers.{i}.{module...}.weight
        if parts[0] != "layers" or len(parts) < 4:
            raise KeyError(f"unexpected parameter {key!r} for a dense Llama export")
        module = ".".join(parts[2:-1])
        if module not in LLAMA_NAMES:
            raise KeyError(f"no Llama name for parameter {key!r}")
        if module == "attention.wq":
            value = rotate_half_order(value, config.n_heads, config.head_dim)
        elif module == "attention.wk":
            value = rotate_half_order(value, config.n_kv_heads, config.head_dim)
        out[f"model.layers.{parts[1]}.{LLAMA_NAMES[module]}.{parts[-1]}"] = value
    return out


def llama_files(model, folder: Path, dtype: torch.dtype):
    from safetensors.torch import save_file

    llama_config(model.config, dtype).save_pretrained(folder)
    state = llama_state_dict(model.state_dict(), model.config)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------------------
# qwen3 format: native Qwen3ForCausalLM / Qwen3MoeForCausalLM, no remote code; minimind3: the published layout


def _rope_fields(config_class, config: LMConfig) -> dict:
    """theta and YaRN in the form this transformers' config class takes (5.x: rope_parameters; 4.x: two fields)."""
    rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    yarn = _active_yarn(config)
    if yarn:
        # attention_factor written out: transformers' own default (0.1 ln(factor) + 1) is not MiniMind-3's.
        rope = {"rope_type": "yarn", "rope_theta": float(config.rope_theta), "factor": float(yarn["factor"]),
                "original_max_position_embeddings": int(yarn["original_max_position_embeddings"]),
                "beta_fast": float(yarn.get("beta_fast", 32.0)), "beta_slow": float(yarn.get("beta_slow", 1.0)),
                "attention_factor": float(yarn.get("attention_factor", 1.0))}
    if "rope_parameters" in inspect.signature(config_class.__init__).parameters:
        return {"rope_parameters": rope}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if yarn else None
    return {"rope_theta": rope["rope_theta"], "rope_scaling": scaling}


def qwen3_config(config: LMConfig, dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3MoeConfig

    check_family(config)
    if config.rope_scaling_factor:
        raise ValueError("--format qwen3: linear RoPE scaling is not part of the MiniMind-3 family; use YaRN")
    cls = Qwen3MoeConfig if config.use_moe else Qwen3Config
    moe = dict(num_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
               moe_intermediate_size=config.expert_hidden_dim, norm_topk_prob=config.norm_topk_prob,
               decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=config.aux_loss_alpha,
               output_router_logits=False) if config.use_moe else {}
    return cls(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, hidden_act="silu", max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
        **_rope_fields(cls, config), **moe, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        architectures=["Qwen3MoeForCausalLM" if config.use_moe else "Qwen3ForCausalLM"], dtype=dtype)


def qwen3_files(model, folder: Path, dtype: torch.dtype):
    from safetensors.torch import save_file

    qwen3_config(model.config, dtype).save_pretrained(folder)
    # MiniMind-3's published tensor names are Qwen3's: one mapping serves both layouts.
    state = {k: v.to("cpu", dtype) for k, v in state_dict_to_minimind3(model.state_dict(), model.config).items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def minimind3_files(model, folder: Path, dtype: torch.dtype):
    write_minimind3(model, folder, dtype)


WRITERS = {"minimind": minimind_files, "llama": llama_files, "qwen3": qwen3_files, "minimind3": minimind3_files}


def check_format(config: LMConfig, fmt: str, dtype: torch.dtype) -> None:
    """Refuse a model the format cannot hold, before anything is built or written (ValueError says why)."""
    if fmt == "llama":
        llama_config(config, dtype)
    elif fmt == "qwen3":
        qwen3_config(config, dtype)
    elif fmt == "minimind3":
        check_family(config)


# ----------------------------------------------------------------------------------------------------------------
# shared parts


# How the exported folder's tokenizer is loaded: with its class named, transformers reads only the tokenizer files.
# AutoTokenizer (transformers 5) first resolves the folder's config.json, whose auto_map points at our remote model
# code, and so stops to ask "trust remote code? [y/N]" for a tokenizer that needs no code at all.
TOKENIZER_LOAD = 'PreTrainedTokenizerFast.from_pretrained("{folder}")'


def write_tokenizer(tokenizer_dir: Path, folder: Path, config: LMConfig):
    """Copy the tokenizer files as they are (a transformers-5 re-save would not load in transformers 4), with
    model_max_length set so pipelines know the context length, and the tokenizer's class named so it loads without
    any remote code."""
    tokenizer = load_tokenizer(tokenizer_dir)  # fails clearly when tokenizer.json is missing
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has no chat template")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, folder / name)
    settings_path = folder / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.exists() else {}
    settings["model_max_length"] = config.context_length
    # Without tokenizer_class, transformers looks the class up through config.json (our remote code); an auto_map
    # would make the tokenizer itself remote code. Ours is a plain tokenizer.json, which the fast class reads as is.
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    settings.pop("auto_map", None)
    settings_path.write_text(json.dumps(settings, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_generation_config(folder: Path, config: LMConfig):
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(folder)


def write_readme(folder: Path, fmt: str, ckpt: str):
    if fmt == "minimind3":
        (folder / "README.md").write_text(
            f"# MiniMind-3 layout\n\nExported from `{Path(ckpt).name}` by MiniMind's `export_model.py`, in the layout "
            "MiniMind-3 publishes its weights in. MiniMind's scripts read it with no model flags, e.g.\n"
            "`python 2-eval.py --ckpt path/to/this/folder`; for vanilla transformers export with `--format qwen3`.\n",
            encoding="utf-8")
        return
    remote = ", trust_remote_code=True" if fmt == "minimind" else ""
    text = f"""# MiniMind ({fmt} format)

Exported from `{Path(ckpt).name}` by MiniMind's `export_model.py`.

```python
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

tokenizer = {TOKENIZER_LOAD.format(folder="path/to/this/folder")}  # no remote code, no prompt
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{remote})
prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "你好"}}], tokenize=False,
                                       add_generation_prompt=True)
ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:], skip_special_tokens=True))
```
"""
    (folder / "README.md").write_text(text, encoding="utf-8")


def forget_module_copy(folder: Path):
    """transformers copies remote code into its modules cache under the folder's name; for our temporary folder
    that copy would be left behind on every export, so remove it (the class stays usable: it is already imported)."""
    try:
        from transformers.dynamic_module_utils import HF_MODULES_CACHE, TRANSFORMERS_DYNAMIC_MODULE_NAME
    except ImportError:  # pragma: no cover - names of a future transformers; leaving the copy is harmless
        return
    # export() names the folder as a valid identifier, which every transformers version uses unchanged
    shutil.rmtree(Path(HF_MODULES_CACHE) / TRANSFORMERS_DYNAMIC_MODULE_NAME / folder.name, ignore_errors=True)


@torch.inference_mode()
def compare_logits(folder: Path, model, fmt: str, dtype: torch.dtype, seed: int = 0) -> tuple[float, float]:
    """(max |logits(export) - logits(our model)|, max |logits|) in float32 over a padded random batch.

    Our model is rounded through the export dtype first, so the check measures the conversion, not the rounding.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if fmt == "minimind":
        # In this process AutoModelForCausalLM would pick our own registered class over the folder's code; load the
        # class from the folder explicitly, so the check covers the code that ships.
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        model_class = get_class_from_dynamic_module(AUTO_MAP["AutoModelForCausalLM"], str(folder))
        forget_module_copy(folder)
        exported = model_class.from_pretrained(str(folder), dtype=torch.float32).eval()
    elif fmt == "minimind3":  # transformers has no class for this layout: read it back as --ckpt/--init do
        config, state = read_minimind3(folder)
        exported = MiniMindForCausalLM(config)
        exported.load_state_dict(state, strict=True)
        exported = exported.float().eval()
    else:
        exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    reference = copy.deepcopy(model).to("cpu", dtype).float().eval()
    g = torch.Generator().manual_seed(seed)
    length = min(16, reference.config.context_length)
    ids = torch.randint(3, reference.config.vocab_size, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : length // 2] = 0  # left padding in the second row exercises the attention mask path
    worst = scale = 0.0
    for m in (torch.ones_like(ids), mask):
        # Positions count real tokens only, as in generation; passed explicitly because a plain Llama forward
        # would number the padding too.
        positions = (m.cumsum(-1) - 1).clamp(min=0)
        ours = reference(ids, attention_mask=m, position_ids=positions).logits
        theirs = exported(input_ids=ids, attention_mask=m, position_ids=positions).logits
        worst = max(worst, float((ours - theirs).abs()[m.bool()].max()))
        scale = max(scale, float(ours.abs().max()))
    return worst, scale


def export(model, out_dir: Path, fmt: str = "minimind", dtype: torch.dtype = torch.float32,
           tokenizer_dir: Path | None = None, force: bool = False, verify: bool = True, ckpt: str = "") -> Path:
    """Write `model` as a transformers folder at out_dir: built under a temporary name, checked, then renamed."""
    out_dir = Path(out_dir)
    check_format(model.config, fmt, dtype)  # e.g. an MoE model as llama fails here, before anything is written
    tmp = staging_folder(out_dir, force)
    try:
        WRITERS[fmt](model, tmp, dtype)
        write_generation_config(tmp, model.config)
        write_tokenizer(Path(tokenizer_dir or family_tokenizer_dir(model.config)), tmp, model.config)
        write_readme(tmp, fmt, ckpt)
        if verify:
            check_logits(*compare_logits(tmp, model, fmt, dtype))
        publish_folder(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def check_logits(diff: float, scale: float) -> None:
    """Refuse an export whose logits differ from the checkpoint's by more than rounding explains."""
    # Different but equivalent kernels (e.g. rotate-half RoPE, repeated kv heads) round differently in fp32;
    # the rounding grows with the size of the logits, hence a tolerance relative to them beyond |logit| 10.
    tolerance = 1e-5 * max(10.0, scale)
    print(f"verified: max |logits difference| = {diff:.2e} (max |logit| {scale:.1f}, tolerance {tolerance:.1e})")
    if not diff <= tolerance:
        raise RuntimeError(f"the exported model's logits differ from the checkpoint's by {diff:.3g}; "
                           "nothing was written")


def staging_folder(out_dir: Path, force: bool) -> Path:
    """A new temporary folder beside out_dir to build the export in (out_dir must be new or empty, or forced)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # The temp name must be a Python identifier: transformers 4.x imports the folder's remote code under its name
    # unchanged, and a "." there splits the module path (mkdtemp adds only [a-z0-9_]).
    safe = re.sub(r"\W", "_", out_dir.name)
    return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f"_{safe}_tmp_"))


def publish_folder(tmp: Path, out_dir: Path) -> None:
    """Give the finished temporary folder the usual permissions and rename it to out_dir (replacing it)."""
    # mkdtemp made the folder private (0700); a published model should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for path in tmp.iterdir():
        path.chmod(0o666 & ~umask)
    if out_dir.exists():
        # Move the old folder aside first, so a crash between the two renames never loses both copies.
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        out_dir.replace(old / "previous")
        tmp.replace(out_dir)
        shutil.rmtree(old)
    else:
        tmp.replace(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# gguf format: one file for llama.cpp / Ollama (model/gguf_export.py), in a folder with its Modelfile


def export_gguf(model, out_dir: Path, dtype_name: str = "float32", tokenizer_dir: Path | None = None,
                force: bool = False, verify: bool = True) -> Path:
    """Write `model` as `out_dir/{out_dir.name}-{TYPE}.gguf` plus an Ollama Modelfile, built in a temporary folder,
    checked by the numpy forward over the file, then renamed; returns the GGUF file's final path."""
    from model.gguf_export import compare_with_model, gguf_arch, write_gguf_folder

    out_dir = Path(out_dir)
    gguf_arch(model.config)  # refuse before anything is written
    tmp = staging_folder(out_dir, force)
    try:
        tokenizer_dir = Path(tokenizer_dir or family_tokenizer_dir(model.config))
        name = write_gguf_folder(model, tmp, dtype_name, tokenizer_dir, out_dir.name).name
        if verify:
            check_logits(*compare_with_model(tmp / name, model, dtype_name))
        publish_folder(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir / name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export a MiniMind .pth checkpoint as a transformers folder or a GGUF file.")
    parser.add_argument("--ckpt", required=True, help="a .pth state dict, e.g. out/full_sft_512.pth")
    parser.add_argument("--out_dir", required=True, help="the folder to create")
    parser.add_argument("--format", choices=(*WRITERS, "gguf"), default="minimind",
                        help="minimind: our classes via trust_remote_code (dense and MoE); llama: native Llama (v1, "
                             "dense); qwen3: native Qwen3 / Qwen3-MoE (MiniMind-3 family); minimind3: MiniMind-3's "
                             "published layout; gguf: one file for llama.cpp / Ollama, with a Modelfile")
    parser.add_argument("--dtype", choices=(*sorted(DTYPES), "q8_0"), default="float32",
                        help="dtype of the saved weights (q8_0: --format gguf only)")
    parser.add_argument("--tokenizer_dir", default=None, help="default: the bundled tokenizer of the model's family")
    parser.add_argument("--force", action="store_true", help="replace out_dir if it exists and is not empty")
    parser.add_argument("--no_verify", action="store_true", help="skip loading the export back to compare logits")
    add_model_args(parser)
    args = parser.parse_args(argv)

    try:
        ckpt = read_checkpoint(args.ckpt, model_flags(args))  # the shape comes from the file
        config = ckpt.config
        if args.format == "gguf":
            return gguf_main(args, ckpt)
        if args.dtype not in DTYPES:
            raise ValueError(f"--dtype {args.dtype} is a GGUF type: use it with --format gguf")
        check_format(config, args.format, DTYPES[args.dtype])  # refuse before building anything
        model = load_model(ckpt, device="cpu", dtype=torch.float32)
        out = export(model, Path(args.out_dir), args.format, DTYPES[args.dtype], args.tokenizer_dir,
                     force=args.force, verify=not args.no_verify, ckpt=args.ckpt)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    remote = ", trust_remote_code=True" if args.format == "minimind" else ""
    print(f"exported {args.ckpt} ({config.file_suffix}, {args.format} format, {args.dtype}) to {out}")
    if args.format == "minimind3":
        print(f"load it with this project's scripts, e.g. python 2-eval.py --ckpt {out}")
        return 0
    print(f'load it with AutoModelForCausalLM.from_pretrained("{out}"{remote})')
    print(f"and its tokenizer with {TOKENIZER_LOAD.format(folder=out)}")
    return 0


def gguf_main(args, ckpt) -> int:
    """main's --format gguf branch: export, then say how llama.cpp and Ollama run the file."""
    from model.gguf_export import gguf_arch

    gguf_arch(ckpt.config)  # refuse before building anything
    model = load_model(ckpt, device="cpu", dtype=torch.float32)
    path = export_gguf(model, Path(args.out_dir), args.dtype, args.tokenizer_dir, force=args.force,
                       verify=not args.no_verify)
    print(f"exported {args.ckpt} ({ckpt.config.file_suffix}, gguf {gguf_arch(ckpt.config)}, {args.dtype}) to {path}")
    print(f"chat with it in llama.cpp: llama-cli -m {path} --jinja   (--jinja: the chat template inside the file)")
    print(f"or in Ollama: ollama create minimind -f {path.parent / 'Modelfile'} && ollama run minimind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
