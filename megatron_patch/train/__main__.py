"""``python -m megatron_patch.train``: the pretraining command (torchrun starts one per rank).

The entry is a package ``__main__`` on purpose: at its first save, megatron-core's checkpoint writer
starts a spawn-context helper process, and a spawned child imports the parent's main module again
unless that is a package's ``__main__``. Were the training module itself the main module, every rank
would wait seconds at its first save for a child to import megatron-core and the model once more.
"""

import sys

from megatron_patch.train import main

sys.exit(main())
