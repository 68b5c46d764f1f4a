"""The floor under any RecordFunction observer: torch's own cost of calling one that does nothing.

The native recorder is a global ``at::RecordFunction`` observer asking for each op's inputs and
outputs. Part of its cost is torch's, paid before the observer runs: building the
RecordFunction, boxing the inputs (``needsInputs``) and the outputs (``needsOutputs``) into
``IValue`` vectors. This script compiles an observer whose callbacks return at once (one ``c++``
call into a temporary directory, as raceguard's own build does; about 15 s) and measures, in one
process with repetitions interleaved, process CPU time against plain torch of:

* ``none``: the empty observer, neither inputs nor outputs asked for;
* ``inputs``: the empty observer with ``needsInputs``;
* ``inputs+outputs``: the empty observer with both (what the native recorder asks for);
* ``record``: the native recorder recording (records dropped undrained, as ``native_capture.py``'s
  ``record`` mode), if it is built.

on the workloads of ``native_capture.py``: ``x.add_(1)`` on a 64x64 tensor, and one training step
of a tiny MLP. Timings are information, never a pass/fail gate.

    python benchmarks/record_function_floor.py [--reps 15]
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import native_capture  # noqa: E402  (the same workloads)

SOURCE = r"""
#include <Python.h>
#include <ATen/record_function.h>
namespace {
std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction&) { return nullptr; }
void on_end(const at::RecordFunction&, at::ObserverContext*) {}
at::CallbackHandle g_handle = 0;
PyObject* install(PyObject*, PyObject* args) {
  int inputs, outputs;
  if (!PyArg_ParseTuple(args, "pp", &inputs, &outputs)) return nullptr;
  at::RecordFunctionCallback cb(&on_start, &on_end);
  cb.scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION});
  cb.needsInputs(inputs);
  cb.needsOutputs(outputs);
  g_handle = at::addGlobalCallback(cb);
  Py_RETURN_NONE;
}
PyObject* remove(PyObject*, PyObject*) {
  at::removeCallback(g_handle);
  Py_RETURN_NONE;
}
PyMethodDef methods[] = {{"install", install, METH_VARARGS, ""}, {"remove", remove, METH_NOARGS, ""},
                         {nullptr, nullptr, 0, nullptr}};
PyModuleDef module = {PyModuleDef_HEAD_INIT, "empty_observer", nullptr, -1, methods};
}  // namespace
PyMODINIT_FUNC PyInit_empty_observer() { return PyModule_Create(&module); }
"""


def build_empty_observer(directory: str):
    from torch.utils import cpp_extension

    source = os.path.join(directory, "empty_observer.cpp")
    with open(source, "w") as f:
        f.write(SOURCE)
    output = os.path.join(directory, "empty_observer" + importlib.machinery.EXTENSION_SUFFIXES[0])
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [os.environ.get("CXX") or "c++", "-O2", "-DNDEBUG", "-std=c++17", "-fPIC", "-shared",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w", *[f"-isystem{p}" for p in cpp_extension.include_paths()],
           f"-isystem{sysconfig.get_paths()['include']}", source, "-o", output, f"-L{lib}",
           f"-Wl,-rpath,{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    subprocess.run(cmd, check=True)
    spec = importlib.util.spec_from_file_location("empty_observer", output)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per mode [15]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        observer = build_empty_observer(directory)
        from raceguard.capture import torch_ops
        from raceguard.capture.native.build import ensure

        recorder = ensure().module  # None: the record column is left out
        modes = {"plain": None, "none": (False, False), "inputs": (True, False), "inputs+outputs": (True, True)}
        if recorder is not None:
            modes["record"] = "record"

        def timed(mode, run) -> float:
            setting = modes[mode]
            if setting == "record":
                recorder.install(sorted(torch_ops.METADATA_ONLY), sorted(torch_ops.FRESH_INPUT),
                                 dict(torch_ops.UNDECLARED_WRITES), *native_capture.RECORD_CAPACITY)
            elif setting is not None:
                observer.install(*setting)
            try:
                start = time.process_time()
                run()
                return time.process_time() - start
            finally:
                if setting == "record":
                    recorder.pause()
                    recorder.discard()
                elif setting is not None:
                    observer.remove()

        for name, factory in (("add_", native_capture.add_loop), ("mlp", native_capture.mlp_loop)):
            work = factory(2000)
            for mode in modes:  # warm-up
                timed(mode, work.run)
            samples: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(args.reps):
                for mode in modes:
                    samples[mode].append(timed(mode, work.run))
            plain = statistics.median(samples["plain"])
            print(f"{name}: {work.label}; {work.ops} ops per repetition (median of {args.reps})")
            for mode in modes:
                med = statistics.median(samples[mode])
                print(f"  {mode:15s} {med / work.ops * 1e6:7.2f} us/op  {med / plain:5.2f}x plain")


if __name__ == "__main__":
    main()
