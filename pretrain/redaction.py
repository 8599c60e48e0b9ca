"""Keep secrets out of what we print and log: credential-like environment values become ***.

Its own module, free of torch, so that the CLI's one-line error path can redact without paying for torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

_SECRET_ENV = re.compile(r"(WANDB_API_KEY|.*_API_KEY|.*_TOKEN|.*_SECRET|.*_PASSWORD)")
_MIN_SECRET_LEN = 4  # masking "1" or "no" everywhere would garble logs and protect nothing
MASK = "***"


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of credential-like environment variables (WANDB_API_KEY, *_TOKEN, *_SECRET, *_PASSWORD, *_API_KEY)."""
    environ = os.environ if environ is None else environ
    return [v for k, v in environ.items() if _SECRET_ENV.fullmatch(k.upper()) and len(v) >= _MIN_SECRET_LEN]


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by ***."""
    for secret in sorted({s for s in secrets if len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
