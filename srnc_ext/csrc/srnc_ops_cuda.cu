// CUDA backend of the srnc_ext ops: one launch per op call, one block per layer.
//
// A block sums the op's kSums values over its layer (strided per-thread sums, then a warp-shuffle
// tree), every thread derives the layer's scalars from the identical totals, and the block writes
// the layer. Only c10 headers here: torch/extension.h or ATen/cuda/CUDAContext.h would quadruple
// the compile time (and the latter does not compile against the local toolkit).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>

#include "srnc_coefficients.h"

namespace srnc {
namespace {

constexpr int kMaxThreads = 512;

// Butterfly sum: every lane ends with the same (bitwise) total.
template <typename acc_t>
__device__ acc_t warp_sum(acc_t x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sums v over the block (blockDim.x a multiple of 32); every thread gets the same totals.
template <int N, typename acc_t>
__device__ void block_sum(acc_t (&v)[N]) {
  __shared__ acc_t partial[N][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int k = 0; k < N; ++k) {
    v[k] = warp_sum(v[k]);
    if (lane == 0) partial[k][warp] = v[k];
  }
  __syncthreads();
  for (int k = 0; k < N; ++k) v[k] = warp_sum(lane < warps ? partial[k][lane] : acc_t(0));
}

template <class Op>
__global__ void __launch_bounds__(kMaxThreads) layerwise_kernel(const Op op) {
  using acc_t = typename Op::acc_t;
  const int64_t l = blockIdx.x, n = op.size();
  acc_t sums[Op::kSums] = {};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) op.accumulate(l, i, sums);
  block_sum(sums);
  if (threadIdx.x == 0) op.record(l, sums);
  const auto scalars = op.scalars(l, sums);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) op.write(l, i, scalars);
}

}  // namespace

template <class Op>
void run_layerwise_cuda(const Op& op, int device) {
  if (op.layers == 0) return;
  TORCH_CHECK(op.layers <= std::numeric_limits<int>::max(), "srnc_ext: too many layers for one launch: ", op.layers);
  // Warps enough for the layer, at most kMaxThreads.
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (op.size() + 31) / 32 * 32)));
  layerwise_kernel<<<static_cast<unsigned>(op.layers), threads, 0, c10::cuda::getCurrentCUDAStream(device)>>>(op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define SRNC_INSTANTIATE(scalar_t, acc_t)                                               \
  template void run_layerwise_cuda(const NormalizeOp<scalar_t, acc_t>&, int);          \
  template void run_layerwise_cuda(const ReweightForwardOp<scalar_t, acc_t>&, int);    \
  template void run_layerwise_cuda(const ReweightBackwardOp<scalar_t, acc_t>&, int);
SRNC_INSTANTIATE(float, float)
SRNC_INSTANTIATE(double, double)
SRNC_INSTANTIATE(c10::Half, float)
SRNC_INSTANTIATE(c10::BFloat16, float)
#undef SRNC_INSTANTIATE

}  // namespace srnc
