"""Sweep files for pretrain.sweep (see each file's docstring)."""
