"""Silence what a diffrl user cannot act on: transformers' warning that its image processors fall back to PIL
without torchvision (diffrl's CPU environments leave torchvision out on purpose), and, when
``logging.progress_bars`` is off, the loading bars of diffusers and transformers."""

from __future__ import annotations

import logging

TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_FALLBACK not in record.getMessage()


def install_filters() -> None:
    """Drop transformers' torchvision fall-back warning (idempotent; needs no import of transformers)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionFallback) for f in logger.filters):
        logger.addFilter(_DropTorchvisionFallback())


def library_progress_bars(enabled: bool) -> None:
    """Show or hide diffusers' and transformers' loading bars (``logging.progress_bars``)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for module in (diffusers.utils.logging, transformers.utils.logging):
        (module.enable_progress_bar if enabled else module.disable_progress_bar)()
