// The extension's entry point: a Python module (so `import sparsemem._C` loads the
// library) whose operators live in torch.ops.sparsemem, registered with
// TORCH_LIBRARY_FRAGMENT by each kernel file, one op per file.
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sparsemem {

// What this build contains, e.g. "cpu openmp threads=2" or "cpu openmp cuda".
std::string ext_info() {
  std::string info = "cpu";
#ifdef _OPENMP
  info += " openmp threads=" + std::to_string(omp_get_max_threads());
#endif
#ifdef SPARSEMEM_WITH_CUDA
  info += " cuda";
#endif
  return info;
}

TORCH_LIBRARY_FRAGMENT(sparsemem, m) {
  m.def("ext_info() -> str", &ext_info);
}

}  // namespace sparsemem

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}
