"""The CUDA loss extension compiles (sm_80 and sm_90) and its two halves agree on the launcher symbols.

Nothing here runs on a GPU: the CPU torch wheel ships the c10/ATen CUDA headers, so the .cu is
compiled by nvcc and the binding .cpp by the host compiler, each to an object file in a temporary
folder, with the flags torch.utils.cpp_extension would use (plus fastkd.ops.builder's own). The
checks: both objects exist, the .cu defines the four host launchers, the .cpp registers the module's
operators (TORCH_LIBRARY, in the module name's namespace) and needs exactly launchers the .cu defines
(same mangled names, so the header is consistent), and ptxas built every kernel for both architectures.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parents[1] / "csrc"
KERNELS = CSRC / "fused_loss_cuda_kernels.cu"
BINDINGS = CSRC / "fused_loss_cuda.cpp"
MODULE = "fastkd_fused_cuda"
ARCHS = ("80", "90")
LAUNCHERS = ("fastkd::cuda::attention_mse_qk_launch", "fastkd::cuda::qk_chunk_residual_launch",
             "fastkd::cuda::attention_kl_rows_launch", "fastkd::cuda::projected_mse_residual_launch")
KERNEL_NAMES = ("attention_mse_qk_pass_kernel", "qk_chunk_residual_kernel", "attention_kl_rows_kernel",
                "projected_mse_residual_kernel")
TIMEOUT_S = 400  # per compiler; the two run side by side (about 110 s each on 2 cores, alone)


def _nvcc() -> str:
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    pytest.skip("nvcc not found: not on PATH, nor under $CUDA_HOME, $CUDA_PATH or /usr/local/cuda")


def _cuda_include(nvcc: str) -> str:
    """The toolkit's include folder (cuda_runtime_api.h), which the host compiler needs for c10/cuda headers."""
    # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one): ask it first.
    dry = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    found = re.findall(r'INCLUDES="([^"]*)"', dry.stdout + dry.stderr)
    candidates = [p[2:] for flags in found for p in flags.split() if p.startswith("-I")]
    candidates += [str(Path(nvcc).resolve().parent.parent / "include"), "/usr/local/cuda/include"]
    for c in candidates:
        if (Path(c) / "cuda_runtime_api.h").is_file():
            return c
    raise AssertionError(f"no cuda_runtime_api.h next to {nvcc}; looked in {candidates}")


def _common_flags() -> list[str]:
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    # torch 2.13's cpp_extension no longer passes the libstdc++ ABI define (torch is built with the new
    # ABI only); it is given explicitly, from torch itself, so an object never mixes the two.
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    defines = [f"-DTORCH_EXTENSION_NAME={MODULE}", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    # The CPU wheel ships c10/cuda headers but not their CMake-generated c10/cuda/impl/cuda_cmake_macros.h
    # (in a CUDA wheel it only defines C10_CUDA_BUILD_SHARED_LIBS, which matters for Windows DLL
    # exports); c10/cuda/CUDAMacros.h skips it under this define. A CUDA wheel compiles as is.
    if not any((Path(inc) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for inc in includes):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return defines + [f for inc in includes for f in ("-isystem", inc)]


def _run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"compiler ran past {TIMEOUT_S}s: {' '.join(cmd)}") from exc
    return proc, time.monotonic() - start


def _symbols(obj: Path, demangle: bool) -> list[tuple[str, str]]:
    """(type letter, name) of each symbol of an object file, as `nm` lists them."""
    out = subprocess.run(["nm"] + (["-C"] if demangle else []) + [str(obj)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(maxsplit=2) if line[:1] != " " else ["", *line.split(maxsplit=1)]
        if len(parts) == 3:
            rows.append((parts[1], parts[2]))
    return rows


def test_cuda_extension_compiles(tmp_path):
    nvcc = _nvcc()
    assert shutil.which("nm") and shutil.which("readelf"), "binutils (nm, readelf) inspect the object files"
    cxx = os.environ.get("CXX", "c++")
    assert shutil.which(cxx), f"no host C++ compiler ({cxx})"
    common = _common_flags()
    cu_obj, cpp_obj = tmp_path / "fused_loss_cuda_kernels.o", tmp_path / "fused_loss_cuda.o"

    gencode = [f for a in ARCHS for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    # --threads 2: the two architectures' device passes side by side once the host compiler is done
    nvcc_cmd = ([nvcc, "-c", str(KERNELS), "-o", str(cu_obj), "-std=c++17", "-O3", "--use_fast_math",
                 "--resource-usage", "--threads", "2", "--compiler-options", "-fPIC"]
                + gencode + cpp_extension.COMMON_NVCC_FLAGS + common)
    cxx_cmd = ([cxx, "-c", str(BINDINGS), "-o", str(cpp_obj), "-std=c++17", "-fPIC", "-O3",
                "-isystem", _cuda_include(nvcc)] + common)

    with ThreadPoolExecutor(max_workers=2) as pool:  # the two compilers run side by side
        nv_future, cxx_future = pool.submit(_run, nvcc_cmd), pool.submit(_run, cxx_cmd)
        (nv, nv_s), (cc, cc_s) = nv_future.result(), cxx_future.result()
    print(f"\nnvcc {nv_s:.0f}s, {cxx} {cc_s:.0f}s")
    assert nv.returncode == 0, f"nvcc failed:\n{' '.join(nvcc_cmd)}\n{nv.stderr[-6000:]}"
    assert cc.returncode == 0, f"{cxx} failed:\n{' '.join(cxx_cmd)}\n{cc.stderr[-6000:]}"
    assert cu_obj.is_file() and cpp_obj.is_file()

    # ptxas reports each kernel per architecture: every kernel was built for both, and the
    # register / spill lines are worth a look when the kernels change (pytest -s shows them).
    ptxas = nv.stdout + nv.stderr
    for kernel in KERNEL_NAMES:
        for arch in ARCHS:
            assert re.search(rf"Compiling entry function '\S*{kernel}\S*' for 'sm_{arch}'", ptxas), \
                f"ptxas did not build {kernel} for sm_{arch}"
    print("\n".join(line for line in ptxas.splitlines() if "registers" in line or "spill" in line))

    # The device code is embedded in the host object (the fat binary section cpp_extension links).
    sections = subprocess.run(["readelf", "-S", "-W", str(cu_obj)], capture_output=True, text=True, check=True,
                              timeout=60).stdout
    assert ".nv_fatbin" in sections, "no fat binary in the .cu object"

    cu_syms = _symbols(cu_obj, demangle=True)
    cu_defined = {name for kind, name in cu_syms if kind == "T"}
    for launcher in LAUNCHERS:
        assert any(name.startswith(launcher + "(") for name in cu_defined), f"{launcher} not defined by the .cu"

    cpp_syms = _symbols(cpp_obj, demangle=True)
    # the operators' registration, in the namespace of the module name (TORCH_EXTENSION_NAME expanded)
    assert ("t", f"TORCH_LIBRARY_init_{MODULE}(torch::Library&)") in cpp_syms, \
        "the .cpp does not register its operators under the module's name"
    cpp_needs = {name for kind, name in cpp_syms if kind == "U" and name.startswith("fastkd::cuda::")}
    assert {n.split("(")[0] for n in cpp_needs} == set(LAUNCHERS), cpp_needs

    # Same mangled names on both sides: host compiler and nvcc agree on the declarations in the header.
    raw_defined = {name for kind, name in _symbols(cu_obj, demangle=False) if kind == "T"}
    raw_needed = {name for kind, name in _symbols(cpp_obj, demangle=False)
                  if kind == "U" and name.startswith("_ZN6fastkd4cuda")}
    assert raw_needed and raw_needed <= raw_defined, raw_needed - raw_defined


# --- the operator schemas against the C++ functions they register ----------------------------------
# A schema that disagrees with its function is found by torch only when the library is loaded, which
# for the CUDA one needs a GPU: checked here from the sources, for both libraries.

SCHEMA_TO_CPP = {"Tensor": "Tensor", "float": "double", "int": "int64_t", "bool": "bool",
                 "Tensor[]": "std::vector<Tensor>"}


def _registrations(text: str) -> list[tuple[str, str]]:
    """(schema, registered C++ function) of each m.def in a TORCH_LIBRARY block (adjacent literals joined):
    the function given to m.def, or for a schema defined alone, the one m.impl registers under its name
    (a kernel for one dispatch key, in a TORCH_LIBRARY_IMPL block)."""
    found = [("".join(re.findall(r'"([^"]*)"', literals)), function)
             for literals, function in re.findall(r'm\.def\(((?:\s*"[^"]*")+),\s*&(\w+)\)', text)]
    impls = dict(re.findall(r'm\.impl\("(\w+)",\s*&(\w+)\)', text))
    for literals in re.findall(r'm\.def\(((?:\s*"[^"]*")+)\)', text):
        schema = "".join(re.findall(r'"([^"]*)"', literals))
        found.append((schema, impls.get(schema.split("(")[0], "<no m.impl>")))
    return found


def _cpp_types(declaration: str) -> str:
    return re.sub(r"\bconst\b|at::|&|\s", "", declaration)


def _cpp_signature(text: str, function: str) -> tuple[str, list[str]]:
    """Return type and parameter types of the function's definition, spelled without const, at:: and &."""
    found = re.search(rf"^(std::vector<(?:at::)?Tensor>|(?:at::)?Tensor)\s+{function}\(([^)]*)\)\s*\{{", text, re.M)
    assert found, f"no definition of {function}"
    params = [" ".join(p.split()[:-1]) for p in found.group(2).split(",")]  # each without its name
    return _cpp_types(found.group(1)), [_cpp_types(p) for p in params]


@pytest.mark.parametrize("kind,source", [("cpu", "fused_loss_cpu.cpp"), ("cuda", "fused_loss_cuda.cpp")])
def test_every_operator_schema_matches_the_function_it_registers(kind, source):
    from fastkd.ops import builder

    text = (CSRC / source).read_text()
    registered = _registrations(text)
    assert sorted(function for _, function in registered) == sorted(builder.OPS[kind])
    for schema, function in registered:
        name, args, returns = re.fullmatch(r"(\w+)\((.*)\) -> (\S+)", schema).groups()
        assert name == function, schema
        schema_types = [SCHEMA_TO_CPP[arg.split()[0]] for arg in args.split(",")]
        assert _cpp_signature(text, function) == (SCHEMA_TO_CPP[returns], schema_types), schema
