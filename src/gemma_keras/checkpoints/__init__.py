"""Checkpoint formats: name/layout mappings between gemma_keras and other Gemma implementations."""
