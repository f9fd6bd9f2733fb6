"""``--use-torch-compile``: compile each block separately.

Blocks are identical in structure, so one compiled graph is reused by all of them (compile
time does not grow with depth), and the graph breaks FSDP's per-block hooks would cause at the
block boundary are avoided. ``nn.Module.compile`` compiles in place: parameter names and
checkpoint keys do not change.
"""

from torch import nn


def compile_blocks(model: nn.Module, backend: str = "inductor") -> nn.Module:
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=False)
    return model
