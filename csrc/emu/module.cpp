// The emulated CUDA ops: the library pretrain_kernels_emu with the schemas of every op of the
// pretrain_kernels namespace, taken from the dispatcher when this module loads (so a new op
// in csrc/ops.cpp gets its emulated twin without a list to keep here), and the CUDA
// implementations of csrc/cuda/*.cu registered for CPU tensors (tests/emulated_cuda.py
// compiles those files against cuda_emulation.h). An op whose CUDA kernel is missing has the
// schema here but no CPU kernel: tests/test_emulated_ops.py fails on it. Load pretrain_kernels
// first. Python helpers: configure the emulated device, read the emulator's counters.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_emulation.h"

namespace {

// Schemas (without the namespace) of every pretrain_kernels op, sorted by name.
std::vector<std::string> pretrain_kernels_schemas() {
  const std::string prefix = "pretrain_kernels::";
  auto& dispatcher = c10::Dispatcher::singleton();
  std::vector<c10::OperatorName> names;
  for (const auto& name : dispatcher.getAllOpNames()) {
    if (name.name.rfind(prefix, 0) == 0) names.push_back(name);
  }
  std::sort(names.begin(), names.end(), [](const c10::OperatorName& a, const c10::OperatorName& b) {
    return std::tie(a.name, a.overload_name) < std::tie(b.name, b.overload_name);
  });
  std::vector<std::string> schemas;
  for (const auto& name : names) {
    const auto op = dispatcher.findSchema(name);
    if (!op.has_value()) continue;  // an implementation registered without a schema: not an op
    std::ostringstream schema;
    schema << op->schema();
    const std::string s = schema.str();
    TORCH_CHECK(s.rfind(prefix, 0) == 0, "unexpected schema ", s);
    schemas.push_back(s.substr(prefix.size()));
  }
  TORCH_CHECK(!schemas.empty(), "no pretrain_kernels op is registered: import pretrain_kernels first");
  return schemas;
}

}  // namespace

TORCH_LIBRARY(pretrain_kernels_emu, m) {
  for (const auto& schema : pretrain_kernels_schemas()) m.def(schema.c_str());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "configure",
      [](int major, int sm_count, bool eager_copies, bool run_ahead) {
        pk::emu::device_props().major = major;
        pk::emu::device_props().multiProcessorCount = sm_count;
        pk::emu::device_props().eager_copies = eager_copies;
        pk::emu::device_props().run_ahead = run_ahead;
      },
      "Compute capability major and SM count of the emulated device; eager_copies: cp.async lands at "
      "once instead of at its wait_group; run_ahead: the lowest-numbered thread that can move runs "
      "first, instead of round-robin.",
      pybind11::arg("major") = 9, pybind11::arg("sm_count") = 4, pybind11::arg("eager_copies") = false,
      pybind11::arg("run_ahead") = false);
  m.def("stats", []() {
    const auto& s = pk::emu::stats();
    return std::map<std::string, int64_t>{{"launches", s.launches},
                                          {"blocks", s.blocks},
                                          {"threads", s.threads},
                                          {"block_barriers", s.block_barriers},
                                          {"warp_collectives", s.warp_collectives},
                                          {"mma", s.mma},
                                          {"atomics", s.atomics}};
  });
}
