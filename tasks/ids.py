"""Stable instruction ids: the hash of the normalised text."""
from __future__ import annotations

import hashlib
import re


def instruction_id(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()[:16]


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()
