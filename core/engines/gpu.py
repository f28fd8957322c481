"""What llama.cpp can offload to on this machine: its devices (read through ctypes) and why a
configured GPU offload cannot happen. Light on purpose: the config check imports it, and it loads
llama_cpp only when an offload is asked for."""

from __future__ import annotations

import sys
from pathlib import Path

# How an admin gets a llama.cpp that can offload: the one line every "no GPU" refusal ends with.
GPU_BUILD_HINT = ("install the GPU build with `BOTD_GPU=cuda bash scripts/run.sh` (it rebuilds llama-cpp-python "
                  "with CUDA; needs the CUDA toolkit (nvcc) and an NVIDIA driver), or set model.n_gpu_layers = 0 "
                  "to run on the CPU")


class Device:
    """One ggml backend device (the CPU, a GPU) as llama.cpp sees it."""

    def __init__(self, name: str, description: str, kind: int, free: int, total: int) -> None:
        self.name, self.description, self.kind, self.free, self.total = name, description, kind, free, total

    @property
    def is_gpu(self) -> bool:
        return self.kind in (1, 2)  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU

    def describe(self) -> str:
        mib = 1024 * 1024
        return f"{self.name} ({self.description}, {self.free // mib} of {self.total // mib} MiB free)"


def devices() -> list[Device] | None:
    """The devices llama.cpp can use, or None when this build does not let us ask.

    llama-cpp-python does not bind ggml's device registry, so it is read through ctypes from
    the libggml next to libllama (loaded already, so this opens no second copy).
    """
    import ctypes

    import llama_cpp

    base = Path(getattr(llama_cpp.llama_cpp, "_base_path", Path(llama_cpp.__file__).parent / "lib"))
    name = {"win32": "ggml.dll", "darwin": "libggml.dylib"}.get(sys.platform, "libggml.so")
    try:
        lib = ctypes.CDLL(str(base / name))
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
            fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_char_p
        lib.ggml_backend_dev_type.argtypes, lib.ggml_backend_dev_type.restype = [ctypes.c_void_p], ctypes.c_int
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.POINTER(ctypes.c_size_t)]
        found = []
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            found.append(Device((lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                                 (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                                 lib.ggml_backend_dev_type(dev), free.value, total.value))
        return found
    except (OSError, AttributeError):
        return None


def gpu_offload_problem(n_gpu_layers: int, main_gpu: int = -1) -> str:
    """Why ``n_gpu_layers`` layers cannot be offloaded by this llama-cpp-python on this machine,
    or "" when they can (or none are asked for). The config check and :meth:`LlamaCppEngine.load`
    both ask: offload that is asked for either happens or stops the start, it never quietly
    runs on the CPU (which llama.cpp itself would do)."""
    if n_gpu_layers == 0:
        return ""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return (f"model.n_gpu_layers: {n_gpu_layers} asks for GPU offload, but this llama-cpp-python build "
                f"has no GPU support (a CPU build); {GPU_BUILD_HINT}")
    found = devices()
    gpus = [d for d in found or [] if d.is_gpu]
    if found is not None and not gpus:
        return (f"model.n_gpu_layers: {n_gpu_layers} asks for GPU offload, but llama.cpp finds no GPU on this "
                "machine (is the NVIDIA driver loaded? is CUDA_VISIBLE_DEVICES empty?); set model.n_gpu_layers = 0 "
                "to run on the CPU")
    if gpus and main_gpu >= len(gpus):
        return f"model.main_gpu: {main_gpu}, but llama.cpp finds {len(gpus)} GPU(s) (numbered from 0)"
    return ""
