"""Build script for nft_cuda.

Always builds the C++ CPU kernels; builds the CUDA kernels when a GPU is visible and a CUDA toolkit and
a CUDA build of torch are present, or when FORCE_CUDA=1 (compiling needs no GPU: CI and Docker builds
set it). Install with

    pip install --no-build-isolation -e .

(an isolated build environment may pick another torch and break the ABI).

Environment switches (all optional):
  FORCE_CUDA=1              build the CUDA kernels even if no GPU is visible; error if impossible
                            (without it a GPU-less machine builds the CPU kernels only, in seconds)
  NFT_CUDA_SKIP_CUDA=1      CPU kernels only (fast local iteration)
  NFT_CUDA_NO_EXT=1         no compiled extension at all (pure-PyTorch package)
  TORCH_CUDA_ARCH_LIST      e.g. "9.0" or "8.0;9.0+PTX"; default: the visible GPU, else 8.0;9.0+PTX
  CUDA_HOME                 CUDA toolkit; default: /usr/local/cuda, then the nvcc on PATH
  NFT_CUDA_PTXAS_VERBOSE=1  print ptxas register/spill reports
  NFT_CUDA_DEBUG=1          -O0 -g builds
  MAX_JOBS                  parallel compile jobs (ninja)

pip shows this script's "[nft_cuda setup]" lines only with -v; the decisions are also written to
nft_cuda/_build_info.json, which nft_cuda.backend_info() reports (and its CUDA fallback warning quotes).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, env=None):
    env = os.environ if env is None else env
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"[nft_cuda setup] {msg}", flush=True)


def _toolkit_root(nvcc):
    """The toolkit directory of an nvcc binary, seeing through wrapper scripts."""
    real = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(real))
    if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    try:  # a wrapper script: ask the real compiler where it lives
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
        m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if m:
            return os.path.realpath(os.path.join(m.group(1), ".."))
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return _toolkit_root(nvcc) if nvcc else None


def pip_cuda_include_dirs():
    """Headers of the pip `nvidia-*` packages (cuBLAS, cuRAND, ...) that come with CUDA torch."""
    dirs = []
    for entry in sys.path:
        base = os.path.join(entry, "nvidia")
        if os.path.isdir(base):
            dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    seen, unique = set(), []
    for d in dirs:
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            unique.append(d)
    return unique


def decide_cuda(env, torch_cuda, cuda_home, gpu_visible):
    """(build the CUDA kernels?, why) from the environment switches and what this machine has.

    The convention of PyTorch extensions: CUDA when a GPU is visible or FORCE_CUDA=1 asks for it; a
    toolkit alone (a GPU-less machine with CUDA installed) does not cost a CUDA build.
    """
    if _flag("NFT_CUDA_SKIP_CUDA", env):
        return False, "NFT_CUDA_SKIP_CUDA=1"
    if _flag("FORCE_CUDA", env):
        if torch_cuda is None:
            raise SystemExit("[nft_cuda setup] FORCE_CUDA=1 but this torch is a CPU-only build")
        if cuda_home is None:
            raise SystemExit("[nft_cuda setup] FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        return True, "FORCE_CUDA=1"
    if torch_cuda is None:
        return False, "this torch is a CPU-only build"
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if not gpu_visible:
        return False, "no GPU visible; set FORCE_CUDA=1 to compile the CUDA kernels anyway"
    return True, f"GPU visible, torch CUDA {torch_cuda}, toolkit {cuda_home}"


def write_build_info(info):
    """Record the build decisions beside the package (read by nft_cuda.backend_info())."""
    path = os.path.join(ROOT, "nft_cuda", "_build_info.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")


def extension_modules():
    if _flag("NFT_CUDA_NO_EXT"):
        _log("NFT_CUDA_NO_EXT=1: no compiled extension; the package runs on pure PyTorch")
        write_build_info({"extension": False, "cuda": False, "why": "NFT_CUDA_NO_EXT=1"})
        return [], {}

    cuda_home = find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it first.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    torch_cuda = torch.version.cuda
    gpu_visible = torch_cuda is not None and torch.cuda.is_available()
    with_cuda, why = decide_cuda(os.environ, torch_cuda, cuda_home, gpu_visible)

    debug = _flag("NFT_CUDA_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = list(opt)  # the C++ standard is torch's choice (C++17 up to 2.13, C++20 after)
    link_flags = []
    if "OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is header code built on `#pragma omp parallel`: without -fopenmp our
        # kernels would silently run on one thread. libgomp resolves to the copy torch loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    macros = []
    kwargs = {}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        major, minor = (int(x) for x in torch_cuda.split(".")[:2])
        macros += [("NFT_WITH_CUDA", None), ("NFT_CUDA_VERSION", str(major * 1000 + minor * 10))]
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        include_dirs += pip_cuda_include_dirs()
        nvcc_flags = opt + ["-lineinfo"]
        if _flag("NFT_CUDA_PTXAS_VERBOSE"):
            nvcc_flags.append("-Xptxas=-v")
        if os.environ.get("NVCC_THREADS"):
            nvcc_flags += ["--threads", os.environ["NVCC_THREADS"]]
        ext_cls = CUDAExtension
        kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        ext_cls = CppExtension
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}

    _log(f"torch {torch.__version__} (CUDA {torch_cuda}); CUDA_HOME={cuda_home}")
    _log(f"CUDA kernels: {'yes' if with_cuda else 'no'} ({why})")
    if with_cuda:
        _log(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPU)')}")
        _log(f"extra include dirs: {include_dirs[2:] or 'none'}")
    _log(f"sources: {', '.join(sources)}")
    write_build_info(
        {
            "extension": True,
            "cuda": with_cuda,
            "why": why,
            "torch": torch.__version__,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        }
    )

    ext = ext_cls(
        name="nft_cuda._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_link_args=link_flags,
        **kwargs,
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import decide_cuda
    ext_modules, cmdclass = extension_modules()
    setup(
        packages=find_packages(include=["nft_cuda", "nft_cuda.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        include_package_data=True,
    )
