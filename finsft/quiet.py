"""Keep the console readable: library progress bars off, and a short list of known-harmless library messages
dropped. Every other warning stays visible.

finsft prints its own progress (a live table on terminals, compact lines in logs), so the per-step bars of
``datasets`` ("Map", "Saving the dataset"), TRL's dataset preparation and ``transformers`` ("Loading weights",
"Writing model shards") only clutter the output.
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex) of warnings that say nothing a finsft user can act on.
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # transformers 5 renamed gradient checkpointing to activation checkpointing; TRL and PEFT still read the old
    # names, which warns on every access.
    (FutureWarning, r"`(is_)?gradient_checkpointing(_enable|_disable|_kwargs)?` is deprecated"),
)

# (logger name, message prefix) of log records that say nothing a finsft user can act on.
HARMLESS_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # bitsandbytes tries an optional CPU kernel from the hub and falls back to its own when that fails.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_libraries() -> None:
    """Turn library progress bars off and drop the known-harmless messages above. Idempotent (each call
    re-installs the warning filters, which ``warnings.catch_warnings`` blocks may have reset); call it before the
    heavy libraries do their work (their loggers are configured by name, so it may run before they are imported).
    """
    for category, pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)  # replaces an identical filter
    for name, prefix in HARMLESS_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # also turns off huggingface_hub's bars
