"""Build and install ganengine.

    pip install --no-build-isolation -e .        # needs torch already installed

Builds ``ganengine._C`` from ``csrc/``:
  * always the C++ CPU kernels (csrc/binding.cpp, csrc/cpu/*.cpp; OpenMP + at::vec, AVX2 when
    the build machine has it, override with GANENGINE_CPU_ARCH=default|avx2|avx512);
  * the CUDA kernels (csrc/cuda/*.cu + their csrc/cuda/*.cpp launchers) for sm_80 and sm_90
    when nvcc and a CUDA build of torch are present. GANENGINE_BUILD_CUDA=0 skips them,
    GANENGINE_BUILD_CUDA=1 makes their absence an error. GANENGINE_CUDA_ARCH="8.0;9.0" sets
    the architectures.
``kernels/`` (Triton) is installed as the subpackage ``ganengine.kernels``.
GANENGINE_SKIP_EXT=1 installs the Python package alone (torch backend, and triton).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def fail(msg: str) -> None:
    sys.stderr.write(f"\nganengine build error: {msg}\n\n")
    sys.exit(1)


def env_flag(name: str):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value not in ("0", "false", "False", "no")


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, also when `nvcc` on PATH is a wrapper script (a wrapper's --dryrun names the real toolkit)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m and os.path.isdir(m.group(1).strip()):
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    real = os.path.realpath(nvcc)
    return os.path.dirname(os.path.dirname(real))


def cpu_arch_flags() -> tuple[list[str], str]:
    choice = os.environ.get("GANENGINE_CPU_ARCH", "auto")
    if choice == "auto":
        flags = ""
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            pass
        choice = "avx2" if (" avx2" in flags and " fma" in flags) else "default"
    if choice == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"], "avx2"
    if choice == "avx512":
        return (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                 "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"], "avx512")
    if choice == "default":
        return [], "default"
    fail(f"GANENGINE_CPU_ARCH must be auto, default, avx2 or avx512, got {choice!r}")
    return [], ""


def extension_modules():
    if env_flag("GANENGINE_SKIP_EXT"):
        print("ganengine: GANENGINE_SKIP_EXT=1, building no C++ extension", flush=True)
        return [], {}

    want_cuda = env_flag("GANENGINE_BUILD_CUDA")
    cuda_home = None
    if want_cuda is not False:
        cuda_home = find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        fail("torch is not installed in this environment. Install it first "
             "(pip install torch==2.14.1), then build with `pip install --no-build-isolation -e .`.")

    cuda_reason = ""
    with_cuda = False
    if want_cuda is False:
        cuda_reason = "GANENGINE_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        cuda_reason = "nvcc not found (put it on PATH or set CUDA_HOME)"
    else:
        with_cuda = True
    if want_cuda and not with_cuda:
        fail(f"GANENGINE_BUILD_CUDA=1 but the CUDA kernels cannot be built: {cuda_reason}.")

    cpu_flags, cpu_name = cpu_arch_flags()
    sources = [os.path.join("csrc", "binding.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define = [("GANENGINE_CPU_FLAGS", f'"{cpu_name}"')]
    cxx = ["-O3", "-fopenmp", "-std=c++20"] + cpu_flags
    link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    arch_list = os.environ.get("GANENGINE_CUDA_ARCH", "8.0;9.0")

    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        launchers = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        stems = {os.path.splitext(p)[0] for p in cu}
        clash = [p for p in launchers if os.path.splitext(p)[0] in stems]
        if clash:
            fail(f"{clash} and the .cu file of the same name would both compile to the same object file: "
                 "name CUDA launchers <family>_launcher.cpp (see docs/DEVELOPING.md).")
        sources += cu + launchers
        # torch's CUDA headers include cusparse.h, cublas_v2.h... that live in the nvidia wheels
        try:
            import nvidia  # namespace package of the CUDA wheels

            for base in nvidia.__path__:
                for inc in glob.glob(os.path.join(base, "*", "include")):
                    include_dirs.append(inc)
        except ImportError:
            pass
        arch_names = ",".join("sm_" + a.replace(".", "") for a in arch_list.split(";"))
        define += [("GANENGINE_WITH_CUDA", "1"), ("GANENGINE_CUDA_ARCH", f'"{arch_names}"')]
        nvcc = ["-O3", "-std=c++20", "-lineinfo", "-Xptxas=-v"]
        ext = cpp_extension.CUDAExtension(
            "ganengine._C", sources, include_dirs=include_dirs, define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        define += [("GANENGINE_CUDA_REASON", f'"{cuda_reason}"')]
        ext = cpp_extension.CppExtension(
            "ganengine._C", sources, include_dirs=include_dirs, define_macros=define,
            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    print(f"ganengine: building _C with cpu={cpu_name}, cuda={'yes (' + arch_list + ')' if with_cuda else 'no: ' + cuda_reason}",
          flush=True)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="ganengine",
    version="0.1.0",
    description="Fused Triton / C++ / CUDA kernels for GAN training, and pix2pix, CycleGAN, StarGAN, StackGAN on them",
    python_requires=">=3.10",
    packages=["ganengine", "ganengine.kernels"] + [
        "ganengine." + p for p in ("ops", "nn", "tools", "models", "data", "train", "metrics", "cli", "bench")
        if os.path.isdir(os.path.join(ROOT, "ganengine", p))
    ],
    package_dir={"ganengine": "ganengine", "ganengine.kernels": "kernels"},
    package_data={"ganengine": ["data/sample/*", "data/sample/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch", "triton", "numpy", "pillow", "tqdm"],
    extras_require={"bench": ["matplotlib"], "export": ["onnx"], "test": ["pytest", "pytest-xdist", "scipy", "onnx", "onnxruntime"],
                    "logging": ["tensorboard"]},
    entry_points={"console_scripts": ["ganengine=ganengine.cli:main"]},
    zip_safe=False,
)
