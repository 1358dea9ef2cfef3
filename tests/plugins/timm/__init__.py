"""Tests of plugins/timm (the accel-timm distribution)."""
