"""Silence the library messages MiniMind's scripts trigger but a user can do nothing about.

Applied once when the `model` package is imported, so every script, the API server and the streamlit page get it.
Each filter names one message by its text and the module that emits it, never a whole category or library, so a
new warning (or one of these from code other than the named module) still shows. Set MINIMIND_SHOW_ALL_WARNINGS=1 to
see everything, e.g. after upgrading transformers/peft/trl/deepspeed.

Only the standard library is imported here: this runs before (and without) transformers.
"""

from __future__ import annotations

import logging
import os
import warnings

# (logger name, start of the message) pairs dropped from the standard logging records.
LOG_NOISE = (
    # (transformers 5's "`past_key_values`/`cache_params` are deprecated", once printed mid-answer in 2-eval.py, is
    # not filtered: model/model.py now fills the output's cache under the field name the installed transformers has.)
    # accelerate imports deepspeed whenever it is installed (to unwrap DeepSpeedEngine models), even in scripts that do
    # not use deepspeed, and deepspeed then announces it found no GPU. Our own scripts already print the device they
    # run on, so this says nothing new; deepspeed's other warnings still show.
    ("DeepSpeed", "Setting accelerator to CPU"),
)

# (message regex, category, emitting module regex) triples for warnings.filterwarnings.
WARNING_NOISE = (
    # peft (0.21 here) reads `model.is_gradient_checkpointing`, deprecated in transformers 5 in favour of
    # `is_activation_checkpointing`; a peft/transformers version mismatch, not something in MiniMind or the user's
    # flags. MiniMind does not use gradient checkpointing either way.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_applied = False


def silence_library_noise() -> None:
    """Install the filters above (once per process; a second call does nothing)."""
    global _applied
    if _applied or os.environ.get("MINIMIND_SHOW_ALL_WARNINGS") == "1":
        return
    _applied = True
    by_logger: dict[str, list[str]] = {}
    for name, prefix in LOG_NOISE:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        # A filter on the logger object itself (created now if the library is not imported yet: the library's own
        # getLogger call returns this same object later), so it holds whatever handlers the library attaches.
        logging.getLogger(name).addFilter(_DropMessages(tuple(prefixes)))
    for message, category, module in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
