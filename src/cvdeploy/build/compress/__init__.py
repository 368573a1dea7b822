"""Compression by training (structured pruning, distillation, QAT): each result enters a bundle as a verified variant."""

from cvdeploy.build.compress.common import add_compressed_variant

__all__ = ["add_compressed_variant"]
