"""Two third-party messages known to be harmless, silenced by their text only (in the CLI, in every sweep
worker and in the shape check's fresh processes)."""
from __future__ import annotations

__all__ = ["KNOWN_HARMLESS", "quiet_known_warnings"]

KNOWN_HARMLESS = ("bitsandbytes' CPU probe for an optional 4-bit kernel package (never used here: no 4-bit "
                  "weights) and transformers' FutureWarning on is_gradient_checkpointing (peft reads the "
                  "deprecated alias)")


def _drop_gemm_4bit(record) -> bool:
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


def quiet_known_warnings() -> None:
    """Silence, by their text only, two third-party messages known to be harmless: ``KNOWN_HARMLESS``."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _drop_gemm_4bit not in log.filters:
        log.addFilter(_drop_gemm_4bit)
