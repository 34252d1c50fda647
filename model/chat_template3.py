"""MiniMind-3's special tokens and ChatML chat template (used by train_tokenizer.py --family minimind-3).

The token names and their order are those of MiniMind-3's published tokenizer (jingyaogong/minimind,
model/tokenizer_config.json), which follows Qwen2.5/Qwen3: ids 0-26 are the Qwen specials, 27-35 are reserved
placeholders. Every one of them is registered as a *special* token, unlike Qwen, where <tool_call>..</think> are
plain added tokens: only special tokens are left as literal text by ``split_special_tokens=True``, which is how
model/dataset.py keeps a "<think>" typed by a user from becoming the control token.

Rendered format (one ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` block per turn):

* a first ``system`` message opens the text; a ``tools`` list (template kwarg) is described inside that system
  turn (which then exists even without a system message), in the wording MiniMind-3 and Qwen use;
* every assistant turn is ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``, an empty reasoning giving
  ``<think>\\n\\n</think>\\n\\n``; the reasoning comes from ``reasoning_content`` or, failing that, from a
  ``<think>...</think>`` block at the start of ``content``. Unlike Qwen3, earlier turns keep their reasoning, so
  that rendering messages[:k+1] starts with the rendering of messages[:k] (training data keeps every turn's
  reasoning, and model/dataset.py renders prefixes);
* ``tool_calls`` (``{"type": "function", "function": {...}}`` or ``{"name", "arguments"}``; arguments a dict or
  a JSON string used verbatim) follow the answer, one ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``
  each, separated by newlines;
* ``tool`` messages become one user turn per run of consecutive tool messages, each result wrapped in
  ``\\n<tool_response>\\n{content}\\n</tool_response>``;
* ``add_generation_prompt`` appends ``<|im_start|>assistant\\n`` and then ``<think>\\n`` when thinking is on
  (``enable_thinking=True``; MiniMind-3's own scripts pass ``open_thinking=True``, accepted as an alias) or the
  empty ``<think>\\n\\n</think>\\n\\n`` when it is off, the default as in MiniMind-3 (Qwen3 defaults to on).
"""

# ids 0..35 in this order
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    *[f"<|buffer{i}|>" for i in range(1, 10)],
]

# The system-turn text describing the tools: MiniMind-3's (and Qwen's) wording, kept so that models and
# tool-call parsers trained on it recognise it.
_TOOLS_INTRO = ("# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
                "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>")
_TOOLS_OUTRO = ("\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
                '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>')

# Whitespace between tags is stripped by the "-" markers, so the layout below is only for reading.
CHAT_TEMPLATE = """
{%- set thinking = enable_thinking if enable_thinking is defined else (open_thinking is defined and open_thinking) -%}
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- if tools -%}
    {{- '<|im_start|>system\\n' -}}
    {%- if has_system and messages[0].content -%}{{- messages[0].content + '\\n\\n' -}}{%- endif -%}
    {{- "TOOLS_INTRO" -}}
    {%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
    {{- "TOOLS_OUTRO" + '<|im_end|>\\n' -}}
{%- elif has_system -%}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- set turns = messages[1:] if has_system else messages -%}
{%- for message in turns -%}
    {%- set content = message.content if message.content is string else '' -%}
    {%- if message.role == 'assistant' -%}
        {%- if message.reasoning_content is string -%}
            {%- set reasoning = message.reasoning_content -%}
        {%- elif '</think>' in content -%}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
            {%- set content = content.split('</think>')[1:] | join('</think>') -%}
        {%- else -%}
            {%- set reasoning = '' -%}
        {%- endif -%}
        {%- set content = content.lstrip('\\n') -%}
        {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content -}}
        {%- for call in message.tool_calls or [] -%}
            {%- set call = call.function if call.function is defined and call.function else call -%}
            {%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}
            {{- '<tool_call>\\n{"name": ' + (call.name | tojson) + ', "arguments": ' -}}
            {{- call.arguments if call.arguments is string else (call.arguments | tojson) -}}
            {{- '}\\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.previtem is not defined or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}
        {%- if loop.nextitem is not defined or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' + ('<think>\\n' if thinking else '<think>\\n\\n</think>\\n\\n') -}}
{%- endif -%}
""".strip().replace("TOOLS_INTRO", _TOOLS_INTRO).replace("TOOLS_OUTRO", _TOOLS_OUTRO)
