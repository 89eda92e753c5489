// srnc_ext ops: argument guards, the CPU backend and the device dispatch. The schemas, fake kernels and
// autograd are declared once, in Python (srnc_ext/ops/contract.py), for every backend; this file only
// registers kernels for them (TORCH_LIBRARY_IMPL). The TORCH_CHECKs here guard memory when
// torch.ops.srnc_ext.* is called directly; the user-facing checks are the contract's.
//
// Each op body checks its arguments, makes inputs contiguous, allocates the outputs and fills one
// of the plain op structs of srnc_coefficients.h, which run_layerwise_cpu (here) or
// run_layerwise_cuda (srnc_ops_cuda.cu, built with -DSRNC_WITH_CUDA) executes.
#include <Python.h>

#include <ATen/DeviceGuard.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "srnc_coefficients.h"

// The fingerprint of the sources this library was built from (_jit_build.source_fingerprint, passed as
// -DSRNC_SOURCES_SHA256=<hex>): srnc_ext reads it from the file before loading the library, since a
// library built from other sources (a schema with another argument count) aborts the process when
// its TORCH_LIBRARY_IMPL registrations run.
#ifndef SRNC_SOURCES_SHA256
#define SRNC_SOURCES_SHA256 unknown
#endif
#define SRNC_STRINGIFY2(x) #x
#define SRNC_STRINGIFY(x) SRNC_STRINGIFY2(x)
extern "C" __attribute__((used, visibility("default"))) const char srnc_sources_sha256[] =
    "SRNC-SOURCES-SHA256:" SRNC_STRINGIFY(SRNC_SOURCES_SHA256);

// `from srnc_ext import _C` loads this library, which runs the TORCH_LIBRARY_IMPL registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace srnc {
namespace {

using at::Tensor;

// Partial sums over chunks, then over chunks: rounding error ~ (chunk + n / chunk) ulp, not n ulp.
constexpr int64_t kChunk = 256;
// Elements per parallel task (at::internal::GRAIN_SIZE): small stacks run on one thread.
constexpr int64_t kGrain = 32768;

template <class Op>
void run_layerwise_cpu(const Op& op) {
  using acc_t = typename Op::acc_t;
  const int64_t n = op.size(), grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n));
  at::parallel_for(0, op.layers, grain, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      acc_t sums[Op::kSums] = {};
      for (int64_t c = 0; c < n; c += kChunk) {
        acc_t part[Op::kSums] = {};
        for (int64_t i = c; i < std::min(n, c + kChunk); ++i) op.accumulate(l, i, part);
        for (int k = 0; k < Op::kSums; ++k) sums[k] += part[k];
      }
      op.record(l, sums);
      const auto scalars = op.scalars(l, sums);
      for (int64_t i = 0; i < n; ++i) op.write(l, i, scalars);
    }
  });
}

constexpr int kLanes = 8;

// Adds the squares of p[0, len) to `lanes` (element i to lane i mod kLanes): independent
// accumulators, so the compiler vectorizes the loop without reassociating a single sum.
template <typename scalar_t, typename acc_t>
inline void add_squares(const scalar_t* p, int64_t len, acc_t (&lanes)[kLanes]) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t v = static_cast<acc_t>(p[i + j]);
      lanes[j] += v * v;
    }
  }
  for (int j = 0; i < len; ++i, ++j) {
    const acc_t v = static_cast<acc_t>(p[i]);
    lanes[j] += v * v;
  }
}

// x86-64 builds default to SSE2; on Linux with GCC the memory-bound normalize loop is also
// compiled for AVX2 and picked at load time (ifunc), for whichever CPU runs it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SRNC_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SRNC_CPU_CLONES
#endif

// One layer of normalize_segments, walking its rows directly instead of element by element
// through NormalizeOp::offset (which does not vectorize). Same arithmetic as the CUDA kernel
// (NormalizeOp::scalars, keep, value); sums in blocks of about kChunk elements.
template <typename scalar_t, typename acc_t>
SRNC_CPU_CLONES void normalize_layer(const NormalizeOp<scalar_t, acc_t>& op, int64_t l) {
  const int64_t rows = op.rows(), inner = op.inner, stride = op.layers * inner;
  acc_t total = 0, lanes[kLanes] = {};
  int64_t filled = 0;
  const auto fold = [&] {
    acc_t block = 0;
    for (acc_t& lane : lanes) {
      block += lane;
      lane = 0;
    }
    total += block;
    filled = 0;
  };
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = op.x + r * stride + l * inner;
    for (int64_t c = 0; c < inner; c += kChunk) {
      const int64_t len = std::min(kChunk, inner - c);
      add_squares(row + c, len, lanes);
      if ((filled += len) >= kChunk) fold();
    }
  }
  fold();
  const acc_t norm = op.scalars(l, &total);
  const bool keep = op.keep(norm);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * stride + l * inner;
    const scalar_t* x = op.x + base;
    scalar_t* out = op.out + base;
    if (keep) {
      for (int64_t j = 0; j < inner; ++j) out[j] = op.value(x[j], norm);
    } else {
      std::copy(op.fallback + base, op.fallback + base + inner, out);
    }
  }
}

template <typename scalar_t, typename acc_t>
void run_layerwise_cpu(const NormalizeOp<scalar_t, acc_t>& op) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, op.n));
  at::parallel_for(0, op.layers, grain, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) normalize_layer(op, l);
  });
}

template <class Op>
void run_layerwise(const Op& op, const Tensor& like) {
  if (!like.is_cuda()) return run_layerwise_cpu(op);
#ifdef SRNC_WITH_CUDA
  run_layerwise_cuda(op, like.get_device());
#else
  TORCH_CHECK(false, "srnc_ext was built without CUDA kernels (rebuild with SRNC_BUILD_CUDA=1)");
#endif
}

// ---- argument checks: every message names the op and the argument ----

void check_dtype(const char* op, const Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              op, ": ", name, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

// `t` must match `ref` in shape, dtype and device.
void check_like(const char* op, const Tensor& ref, const char* ref_name, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device ", ref.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have ", ref_name, "'s dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have ", ref_name, "'s shape ", ref.sizes(),
              ", got ", t.sizes());
}

// A small per-layer or per-tap tensor: given shape, floating dtype, `ref`'s device.
void check_small(const char* op, const Tensor& ref, const Tensor& t, const char* name, at::IntArrayRef shape,
                 const char* shape_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on kernel's device ", ref.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must be ", shape_name, " = ", shape, ", got ", t.sizes());
}

// Checked, contiguous inputs of both reweight ops; gram and consts converted to the accumulation type.
struct ReweightInputs {
  Tensor kernel, s1, direction, s1_out, gram, consts;
};

ReweightInputs reweight_inputs(const char* op, const Tensor& kernel, const Tensor& s1, const Tensor& direction,
                               const Tensor& s1_out, const Tensor& gram, const Tensor& consts, int64_t variant,
                               double floor) {
  TORCH_CHECK(variant == kVariantSN || variant == kVariantPaper || variant == kVariantProjected, op,
              ": variant must be 0 (SN), 1 (paper) or 2 (projected), got ", variant);
  TORCH_CHECK(std::isfinite(floor) && floor >= 0, op, ": floor must be finite and >= 0, got ", floor);
  TORCH_CHECK(kernel.dim() == 3, op, ": kernel must be (L, M, T), got shape ", kernel.sizes());
  check_dtype(op, kernel, "kernel");
  check_like(op, kernel, "kernel", s1, "s1");
  check_like(op, kernel, "kernel", direction, "direction");
  check_like(op, kernel, "kernel", s1_out, "s1_out");
  const int64_t layers = kernel.size(0), taps = kernel.size(2);
  check_small(op, kernel, gram, "gram", {taps, taps}, "(T, T)");
  check_small(op, kernel, consts, "consts", {layers, 2}, "(L, 2)");
  const auto acc = at::toOpMathType(kernel.scalar_type());
  return {kernel.contiguous(), s1.contiguous(), direction.contiguous(), s1_out.contiguous(),
          gram.to(acc).contiguous(), consts.to(acc).contiguous()};
}

template <typename scalar_t, typename acc_t>
ReweightArgs<scalar_t, acc_t> reweight_args(const ReweightInputs& in, const Tensor& out, double alpha,
                                            double beta_rank, double positions, double eps, int64_t variant,
                                            double floor) {
  return {in.kernel.const_data_ptr<scalar_t>(), in.s1.const_data_ptr<scalar_t>(),
          in.direction.const_data_ptr<scalar_t>(), in.s1_out.const_data_ptr<scalar_t>(),
          in.gram.const_data_ptr<acc_t>(), in.consts.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
          in.kernel.size(0), in.kernel.size(1), in.kernel.size(2), alpha, beta_rank, positions, eps,
          static_cast<int>(variant), floor};
}

// ---- the ops ----

Tensor normalize_segments(const Tensor& x_, const Tensor& fallback_, double eps) {
  const char* op = "normalize_segments";
  TORCH_CHECK(x_.dim() == 2 || x_.dim() == 3, op, ": x must be (L, N) or (P, L, M) (segment l is x[:, l, :]), got shape ",
              x_.sizes());
  check_dtype(op, x_, "x");
  check_like(op, x_, "x", fallback_, "fallback");
  const at::OptionalDeviceGuard guard(at::device_of(x_));  // CUDA: allocate and launch on x's device
  const Tensor x = x_.contiguous(), fallback = fallback_.contiguous();
  Tensor out = at::empty(x.sizes(), x.options());
  const bool rows = x.dim() == 3;
  const int64_t layers = x.size(rows ? 1 : 0), inner = x.size(x.dim() - 1);
  const int64_t n = rows ? x.size(0) * inner : inner;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_segments", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const NormalizeOp<scalar_t, acc_t> impl{x.const_data_ptr<scalar_t>(), fallback.const_data_ptr<scalar_t>(),
                                            out.mutable_data_ptr<scalar_t>(), layers, n, inner, eps};
    if (n > 0) run_layerwise(impl, x);
  });
  return out;
}

std::tuple<Tensor, Tensor> reweight_forward(const Tensor& kernel, const Tensor& s1, const Tensor& direction,
                                            const Tensor& s1_out, const Tensor& gram, const Tensor& consts,
                                            double alpha, double beta_rank, double positions, double eps,
                                            int64_t variant, double floor) {
  const char* op = "reweight_forward";
  const at::OptionalDeviceGuard guard(at::device_of(kernel));
  const ReweightInputs in = reweight_inputs(op, kernel, s1, direction, s1_out, gram, consts, variant, floor);
  Tensor out = at::empty(kernel.sizes(), in.kernel.options());
  Tensor stats = at::empty({kernel.size(0), 3}, in.consts.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kernel.scalar_type(), "reweight_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ReweightForwardOp<scalar_t, acc_t> impl{
        reweight_args<scalar_t, acc_t>(in, out, alpha, beta_rank, positions, eps, variant, floor),
        stats.mutable_data_ptr<acc_t>()};
    run_layerwise(impl, in.kernel);
  });
  return {out, stats};
}

Tensor reweight_backward(const Tensor& grad, const Tensor& kernel, const Tensor& s1, const Tensor& direction,
                         const Tensor& s1_out, const Tensor& gram, const Tensor& consts, const Tensor& stats,
                         double alpha, double beta_rank, double positions, double eps, int64_t variant,
                         double floor) {
  const char* op = "reweight_backward";
  const at::OptionalDeviceGuard guard(at::device_of(kernel));
  const ReweightInputs in = reweight_inputs(op, kernel, s1, direction, s1_out, gram, consts, variant, floor);
  check_like(op, kernel, "kernel", grad, "grad");
  check_small(op, kernel, stats, "stats", {kernel.size(0), 3}, "(L, 3)");
  const Tensor grad_c = grad.contiguous(), stats_c = stats.to(in.consts.scalar_type()).contiguous();
  Tensor out = at::empty(kernel.sizes(), in.kernel.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kernel.scalar_type(), "reweight_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ReweightBackwardOp<scalar_t, acc_t> impl{
        reweight_args<scalar_t, acc_t>(in, out, alpha, beta_rank, positions, eps, variant, floor),
        grad_c.const_data_ptr<scalar_t>(), stats_c.const_data_ptr<acc_t>()};
    run_layerwise(impl, in.kernel);
  });
  return out;
}

}  // namespace
}  // namespace srnc

// The same bodies serve both devices: run_layerwise picks the backend from the tensors' device.
TORCH_LIBRARY_IMPL(srnc_ext, CPU, m) {
  m.impl("normalize_segments", &srnc::normalize_segments);
  m.impl("reweight_forward", &srnc::reweight_forward);
  m.impl("reweight_backward", &srnc::reweight_backward);
}

#ifdef SRNC_WITH_CUDA
TORCH_LIBRARY_IMPL(srnc_ext, CUDA, m) {
  m.impl("normalize_segments", &srnc::normalize_segments);
  m.impl("reweight_forward", &srnc::reweight_forward);
  m.impl("reweight_backward", &srnc::reweight_backward);
}
#endif
