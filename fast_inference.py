"""Chat with a MiniMind checkpoint in the browser (streamlit).

    streamlit run fast_inference.py
    streamlit run fast_inference.py -- --ckpt out/full_sft_512_moe.pth
    streamlit run fast_inference.py --server.address 127.0.0.1 --server.port 8501 -- --device cpu

Flags after `--`: --ckpt (the checkpoint selected at start; default the newest out/full_sft_<dim>.pth),
--tokenizer_dir and --device. A checkpoint's shape is read from the file; model flags (--dim ...) only have to agree. The sidebar lists every out/*.pth and
takes any other path; it also holds the sampling settings, the system prompt and a button that clears the chat.
The model is loaded once per (checkpoint, shape, device) and shared by every browser tab, on the GPU when there is one.
Each turn sends the whole conversation through the chat template; the oldest turns are dropped when it no longer fits.
A MiniMind-3-family model gets a "Thinking" switch: its reasoning streams into a collapsible "Thinking" block above
the answer, and any tool calls it writes are shown as structured items.
"""

import argparse
import sys
from pathlib import Path

import streamlit as st

from model.checkpoint import (
    OUT_DIR,
    ROOT_DIR,
    CheckpointError,
    default_device,
    find_checkpoint,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from model.generate import SamplingParams
from model.LMConfig import add_model_args, model_flags
from model.serving import ChatEngine
from model.tool_calls import ReplyParser, collect_events

st.set_page_config(page_title="MiniMind", page_icon="🤖")


def parse_args():
    parser = argparse.ArgumentParser(prog="streamlit run fast_inference.py --")
    parser.add_argument("--ckpt", default=None, help="checkpoint selected at start (default: the newest out/full_sft_<dim>.pth)")
    parser.add_argument("--tokenizer_dir", default=None)
    parser.add_argument("--device", default=None, help="cuda / mps / cpu (default: best available)")
    add_model_args(parser)
    return parser.parse_known_args(sys.argv[1:])


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def load_engine(ckpt: str, modified: float, flags: tuple, tokenizer_dir: str | None, device: str) -> ChatEngine:
    """Cached on its arguments: `modified` (the file's mtime) makes a re-trained checkpoint load again."""
    dtype = resolve_dtype(None, device, fp16_fallback=False)
    model = load_model(ckpt, device=device, dtype=dtype, flags=dict(flags))  # the shape comes from the file
    # One engine for every tab: its scheduler thread batches the tabs' replies together.
    return ChatEngine(model, load_tokenizer(tokenizer_dir, model.config), max_batch=8).start()


def stream_reply(reply, thinking: bool) -> dict:
    """Stream a MiniMind-3 reply: reasoning into a collapsible block, the answer below it, then each tool call as
    a JSON item. The assistant message to keep: content, and reasoning_content / tool_calls when there are any."""
    thoughts = st.expander("Thinking", expanded=True) if thinking else None
    thought_slot = thoughts.empty() if thoughts is not None else None
    answer_slot = st.empty()
    parser, events, shown = ReplyParser(thinking=thinking), [], {"reasoning": "", "content": ""}
    for piece in [*reply, None]:
        new = parser.flush() if piece is None else parser.push(piece)
        for kind, value in new:
            events.append((kind, value))
            if kind == "tool_call":
                continue
            shown[kind] += value
            slot = thought_slot if kind == "reasoning" and thought_slot is not None else answer_slot
            slot.markdown(shown[kind])
    parsed = collect_events(events)
    for call in parsed.tool_calls:
        st.caption(f"tool call: {call['function']['name']}")
        st.json(call["function"])
    message = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning:
        message["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
    return message


def show_message(message: dict) -> None:
    if message.get("reasoning_content"):
        with st.expander("Thinking", expanded=False):
            st.markdown(message["reasoning_content"])
    st.markdown(message["content"])
    for call in message.get("tool_calls", []):
        st.caption(f"tool call: {call['function']['name']}")
        st.json(call["function"])


def show_name(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT_DIR))
    except ValueError:
        return str(path)


try:
    args, unknown = parse_args()
except SystemExit:  # argparse already printed why to the terminal
    st.error("Bad command-line flags (see the terminal). Usage: `streamlit run fast_inference.py -- --ckpt PATH`")
    st.stop()
flags = model_flags(args)
device = args.device or default_device()

# --- Sidebar: which model, how to sample ---------------------------------------------------------------------------
st.sidebar.title("MiniMind")
try:
    default_ckpt = Path(args.ckpt) if args.ckpt else find_checkpoint(OUT_DIR, "full_sft", flags)
except CheckpointError:  # nothing trained yet: the page says so below
    default_ckpt = OUT_DIR / "full_sft_512.pth"
choices = sorted({default_ckpt, *OUT_DIR.glob("*.pth")}, key=lambda p: (p != default_ckpt, str(p)))
chosen = st.sidebar.selectbox("Checkpoint", choices, format_func=show_name)
typed = st.sidebar.text_input("…or another checkpoint path", "").strip()
ckpt = Path(typed).expanduser() if typed else chosen
if unknown:
    st.sidebar.warning(f"ignored command-line arguments: {' '.join(unknown)}")

if "messages" not in st.session_state:
    st.session_state.messages = []
if st.sidebar.button("Clear history", use_container_width=True):
    st.session_state.messages = []

st.title("MiniMind chat")
if not ckpt.exists():  # a .pth file, or a released MiniMind-3 folder
    st.info(f"No checkpoint at `{show_name(ckpt)}`. Train one (e.g. `python 3-full_sft.py`), pick another file in "
            "the sidebar, or start the page with `streamlit run fast_inference.py -- --ckpt PATH`.")
    st.stop()
try:
    engine = load_engine(str(ckpt), ckpt.stat().st_mtime, tuple(sorted(flags.items())), args.tokenizer_dir, device)
except (FileNotFoundError, RuntimeError, ValueError, OSError) as err:
    st.error(f"Could not load `{show_name(ckpt)}`:\n\n{err}")
    st.stop()
config = engine.model.config
st.sidebar.caption(f"shape (from the file): dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads"
                   f"{', MoE' if config.use_moe else ''} · {device}")

temperature = st.sidebar.slider("Temperature (0 = greedy)", 0.0, 1.5, 0.7, 0.05)
top_p = st.sidebar.slider("Top-p", 0.05, 1.0, 0.9, 0.05)
max_new_tokens = int(st.sidebar.number_input("Max new tokens", 1, engine.max_reply_tokens,
                                             max(1, engine.context_length // 4), step=16))
system_prompt = st.sidebar.text_area("System prompt", "", help="prepended to every conversation")
thinking = engine.native_tools and st.sidebar.toggle("Thinking", False,
                                                     help="MiniMind-3 family: let the model reason before answering")

# --- The conversation ------------------------------------------------------------------------------------------------
for message in st.session_state.messages:
    with st.chat_message(message["role"]):
        show_message(message)

if question := st.chat_input("Message MiniMind"):
    st.session_state.messages.append({"role": "user", "content": question})
    with st.chat_message("user"):
        st.markdown(question)
    conversation = ([{"role": "system", "content": system_prompt}] if system_prompt.strip() else []) \
        + st.session_state.messages
    # Leave room for the reply, but never more than half the context, so a long reply setting cannot push the
    # question itself out (a reply longer than the room left slides the window instead). The oldest turns go first.
    reply_room = min(max_new_tokens, engine.context_length // 2)
    budget = max(engine.min_prompt_tokens, engine.context_length - reply_room)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if engine.native_tools:
        prompt_ids = engine.build_prompt(conversation, budget=budget, enable_thinking=thinking)
        with st.chat_message("assistant"):
            st.session_state.messages.append(stream_reply(engine.reply(prompt_ids, params), thinking))
    else:
        prompt_ids = engine.build_prompt(conversation, budget=budget)
        with st.chat_message("assistant"):
            answer = st.write_stream(engine.reply(prompt_ids, params))
        answer = answer if isinstance(answer, str) else "".join(map(str, answer))
        st.session_state.messages.append({"role": "assistant", "content": answer})
