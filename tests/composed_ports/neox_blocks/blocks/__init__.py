"""Building blocks copied from the import-model skill's templates/blocks into this port (self-contained: max, numpy, stdlib only).

Each file keeps its ``BLOCK_VERSION``; a test checks these copies are
byte-identical to templates/blocks.
"""
