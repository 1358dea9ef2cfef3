"""Tests of plugins/transformers (the accel-transformers distribution)."""
