"""Measuring refusal: judges and per-policy refusal tables."""
