// The emulated CUDA ops: the library pretrain_kernels_emu with the schemas of every
// pretrain_kernels op that has a CUDA kernel (read from the dispatcher, so they never drift)
// and the CUDA implementations of csrc/cuda/*.cu registered for CPU tensors (tests/
// emulated_cuda.py compiles those files against cuda_emulation.h). Load pretrain_kernels
// first. Python helpers: configure the emulated device, read the emulator's counters.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "cuda_emulation.h"

TORCH_LIBRARY(pretrain_kernels_emu, m) {
  const std::string prefix = "pretrain_kernels::";
  for (const char* name : {"flash_attn_fwd", "flash_attn_bwd", "flash_attn_kvcache", "mlm_mask", "span_mask", "sample",
                           "top_k_top_p_filter", "speculative_accept", "add_noise", "diffusion_loss",
                           "diffusion_loss_backward", "ddpm_step", "ddim_step", "euler_step", "heun_step",
                           "dpmpp_2m_step", "flow_match_step"}) {
    const auto op = c10::Dispatcher::singleton().findSchema({prefix + name, ""});
    TORCH_CHECK(op.has_value(), "pretrain_kernels::", name, " is not registered: import pretrain_kernels first");
    std::ostringstream schema;
    schema << op->schema();
    std::string s = schema.str();
    TORCH_CHECK(s.rfind(prefix, 0) == 0, "unexpected schema ", s);
    m.def(s.substr(prefix.size()).c_str());
  }
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
