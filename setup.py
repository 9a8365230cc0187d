"""megadeep, plus its csrc kernels as the extension ``megadeep._C``.

The extension needs torch at build time (``pip install --no-build-isolation -e .``, as
scripts/setup.sh does). Without an importable torch the package installs without it, and
``megadeep.ops`` runs plain PyTorch instead. CUDA kernels are added when torch has CUDA and a CUDA
toolkit is found; ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (A100 and H100 by default when
no GPU is visible at build time). ``MEGADEEP_CUDA=0`` builds the CPU kernels only.
"""
import os
import platform
import sys

from setuptools import find_packages, setup

CPU_SOURCES = ["csrc/ops.cpp", "csrc/cpu/rms_norm.cpp", "csrc/cpu/swiglu.cpp", "csrc/cpu/rope.cpp"]
CUDA_SOURCES = ["csrc/cuda/bindings.cpp", "csrc/cuda/rms_norm.cu", "csrc/cuda/swiglu.cu", "csrc/cuda/rope.cu"]
# at::parallel_for is a header template whose OpenMP loop is compiled into our own objects: without
# -fopenmp it silently runs on one thread. The OpenMP runtime is torch's own (resolved at load time).
# -g0 drops Python's default -g (debug info doubles the build time); ATen's headers carry CUDA-only
# `#pragma unroll`s that GCC warns about.
CXX_FLAGS = ["-O3", "-fopenmp", "-g0", "-Wno-unknown-pragmas"]
# ATen's Vectorized uses AVX2 intrinsics only when CPU_CAPABILITY_AVX2 is defined (and names its inline
# namespace after CPU_CAPABILITY). megadeep.ops loads the build only where torch reports AVX2 or better.
X86_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
NVCC_FLAGS = ["-O3", "-std=c++20"]
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# Every third-party module megadeep imports at run time (tests/test_packaging.py checks it against the
# source). torch comes first and from the right index (CPU or CUDA wheel): see scripts/setup.sh.
INSTALL_REQUIRES = [
    "torch", "deepspeed>=0.19.8,<0.20", "numpy", "pyyaml", "safetensors", "sentencepiece", "rich",
    "tensorboard", "matplotlib", "pyarrow", "tokenizers>=0.20",  # Hugging Face tokenizer.json (encode_batch_fast)
    # data preparation: datatrove's executors, its JSON-lines I/O (orjson) and logger (loguru, which
    # megadeep quiets), .jsonl.zst inputs (zstandard, opened through datatrove's fsspec)
    "datatrove>=0.10.1,<0.11", "orjson", "loguru", "zstandard",
]
EXTRAS_REQUIRE = {"mpi": ["mpi4py"]}  # ranks from an MPI launcher (megadeep.launch.env)


def kernels() -> dict:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("megadeep: torch is not importable at build time, so the csrc kernels are not built "
              "(install torch first and use pip install --no-build-isolation)", file=sys.stderr)
        return {}
    cxx = CXX_FLAGS + (X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else [])
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("MEGADEEP_CUDA", "1") != "0")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS  # torch cannot ask a GPU which one
        ext = cpp_extension.CUDAExtension(
            "megadeep._C", CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx + ["-DMEGADEEP_WITH_CUDA"], "nvcc": NVCC_FLAGS},
        )
    else:
        ext = cpp_extension.CppExtension("megadeep._C", CPU_SOURCES, extra_compile_args={"cxx": cxx})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="megadeep",
    version="0.1.0",
    description="Llama pre-training with Megatron-style tensor parallelism on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["megadeep", "megadeep.*"]) + ["megadeep.ds_configs"],
    package_dir={"megadeep.ds_configs": "ds_configs"},
    package_data={"megadeep.ds_configs": ["*.json", "precision/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["megadeep=megadeep.cli:main"]},
    **kernels(),
)
