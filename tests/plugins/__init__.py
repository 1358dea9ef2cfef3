"""Tests of the first-party plugins in plugins/, one package per plugin (names mirror plugins/)."""
