"""Checkpoint converters: PyTorch-trained TerDiT checkpoints (and SD-VAE decoders) -> .tdit files.

This package is installed as ``terdit_edge.converters``. It is the only part of terdit-edge that
imports torch, and only inside the functions that read torch checkpoints.
"""
