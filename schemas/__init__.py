"""Pandera contracts between AutoIF steps (installed as ``autoif.schemas``).

Every step output carries ``reason``: null for a kept row, the cause for a dropped one.
"""
