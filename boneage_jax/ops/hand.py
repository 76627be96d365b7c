"""Hand masks, rotation alignment, ROI crops and marker suppression."""

from __future__ import annotations

__all__: list[str] = []
