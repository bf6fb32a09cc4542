"""Loaded by every Python process that `python -m benchmarks.slower_cpu` starts (this folder is put on PYTHONPATH):
once `torch.cpu` is imported, its feature checks deny what `SSB_STANDIN_ISA` does not have, so torch and the CPU build
of vLLM pick the kernels (and the engine its dtype) of that smaller CPU. Benchmarking only: never on the product's path.
"""

import importlib.abc
import importlib.util
import os
import sys

DENIED = {
    "avx2": ["_is_avx512_supported", "_is_vnni_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported",
             "_is_amx_fp16_supported"],
    "avx512": ["_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"],
}


class DenyCpuFeatures(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `torch.cpu` is about to load, wraps its loader to patch the module once loaded."""

    def __init__(self, denied: list[str]):
        self.denied = denied

    def find_spec(self, name, path, target=None):
        if name != "torch.cpu":
            return None
        sys.meta_path.remove(self)  # once, and without finding itself again
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            for feature in self.denied:
                setattr(module, feature, lambda: False)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("SSB_STANDIN_ISA") in DENIED:
    sys.meta_path.insert(0, DenyCpuFeatures(DENIED[os.environ["SSB_STANDIN_ISA"]]))
