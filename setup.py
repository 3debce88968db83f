"""Builds codellama_ext._C from csrc/ (torch-free kernels) and python/ (the binding layer).

CUDA kernels are compiled whenever torch is a CUDA build and a CUDA toolkit is found; the GPU itself is never
queried, so a CPU-only build machine produces a CUDA-capable package. Environment knobs:

  CUDA_HOME / CUDA_PATH      toolkit folder (found by itself otherwise, also behind an `nvcc` wrapper script)
  TORCH_CUDA_ARCH_LIST       GPU architectures (default "8.0;8.6;8.9;9.0")
  CODELLAMA_CPU_ONLY=1       skip the CUDA kernels even with a CUDA toolkit present
  CODELLAMA_CPU_FLAGS        host ISA flags for the CPU kernels (default "-march=native": built where it runs)
  MAX_JOBS                   parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def _toolkit_behind_wrapper(nvcc):
    """The toolkit folder named inside an `nvcc` wrapper script (e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`)."""
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for match in re.finditer(rb"(/[^\s'\"]+)/bin/nvcc\b", head):
        candidate = match.group(1).decode(errors="replace")
        if _is_toolkit(candidate):
            return candidate
    return None


def find_cuda_home():
    """The CUDA toolkit folder (the one holding bin/nvcc, include/ and lib64/), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        parent = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(parent):
            return parent
        behind = _toolkit_behind_wrapper(real)
        if behind:
            return behind
    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _is_toolkit(candidate):
            return candidate
    return None


def nvidia_wheel_includes():
    """Include folders of the `nvidia-*` pip wheels (cuBLAS, cuSPARSE headers that torch's headers pull in)."""
    roots = set(sys.path)
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # virtualenvs of old Pythons
        pass
    found = []
    for root in sorted(r for r in roots if r and os.path.isdir(os.path.join(r, "nvidia"))):
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def build_extension():
    cuda_home = None if os.environ.get("CODELLAMA_CPU_ONLY") == "1" else find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import; a wrapper nvcc on PATH misleads its guess.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    with_cuda = bool(cuda_home) and torch.version.cuda is not None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

    cpu_flags = os.environ.get("CODELLAMA_CPU_FLAGS", "-march=native").split()
    cxx = ["-O3", "-fopenmp", *cpu_flags]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("python/*.cpp") + glob.glob("python/ops/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += nvidia_wheel_includes()
        define_macros.append(("CODELLAMA_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": nvcc}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}
    print(f"codellama_ext: building {'CPU + CUDA (' + cuda_home + ', archs ' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if with_cuda else 'CPU only'}")
    ext = ext_cls(
        name="codellama_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return ext, cpp_extension.BuildExtension.with_options(use_ninja=True)


ext, build_ext = build_extension()

setup(
    name="codellama_ext",
    version="0.1.0",
    description="A fast, small, dependable engine for Meta's CodeLlama models",
    packages=find_packages(include=["codellama_ext", "codellama_ext.*"]),
    package_data={"codellama_ext": ["default_model/*"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",  # torch 2.13 / 2.14 need 3.10
    install_requires=["torch>=2.4", "numpy", "sentencepiece", "safetensors"],
    extras_require={"test": ["pytest", "hypothesis", "transformers==4.57.6", "protobuf"]},
    entry_points={"console_scripts": ["codellama-ext=codellama_ext.cli:main"]},
)
