"""Evaluation: answer extraction and checking (experiments build on these)."""
