"""Logging under the ``lmcache_connector`` logger, visible next to vLLM's own lines.

vLLM configures only its own ``vllm`` logger, so without a handler our INFO lines would vanish.
When the application has configured logging (the root logger has handlers), records propagate
there instead and nothing is added.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "lmcache_connector"


def configure_logging(level: str) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(
            logging.Formatter("%(levelname)s %(asctime)s [lmcache_connector] %(message)s", "%m-%d %H:%M:%S")
        )
        logger.addHandler(handler)
        logger.propagate = False
    return logger
