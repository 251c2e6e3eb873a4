"""Building blocks of the StableLmForCausalLM port, copied from the import-model skill's templates/blocks.

Written by scaffold.py --with. Each file is self-contained (max, numpy and the
standard library only) and keeps its BLOCK_VERSION; scaffold_manifest.json
records its version and sha256. Import them relatively (``from .blocks.norms
import LayerNormF32``); edit a copy only knowing it then differs from the library.

Copied:
- norms: blocks/norms.py, version 1
- attention: blocks/attention.py, version 2
- residual: blocks/residual.py, version 1
"""
