// Arithmetic shared by the CPU (srnc_ops.cpp) and CUDA (srnc_ops_cuda.cu) kernels of the srnc_ext ops.
//
// coefficients / coefficients_vjp are line-by-line transcriptions of srnc_ext/ops/coefficients.py's
// _unfloored_* functions, floored_coefficients / floored_coefficients_vjp of its coefficients /
// coefficients_vjp with a floor tau > 0 (tau = 0 runs the unfloored ones, exactly as without the
// floor), and the op structs below transcribe srnc_ext/ops/naive.py. Every op has the same shape:
// per layer l, sum kSums values over the layer's elements (accumulate), turn the sums into the
// layer's scalars (scalars), then write each element (write). Each backend runs that loop once
// (run_layerwise_cpu / the CUDA layerwise kernel); no torch types appear here.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define SRNC_HOST_DEVICE __host__ __device__
#else
#define SRNC_HOST_DEVICE
#endif

namespace srnc {

constexpr int kVariantSN = 0, kVariantPaper = 1, kVariantProjected = 2;

// torch.clamp semantics, NaN propagating.
template <typename T>
SRNC_HOST_DEVICE inline T clamp_min(T x, T lo) { return x < lo ? lo : x; }
template <typename T>
SRNC_HOST_DEVICE inline T clamp_max(T x, T hi) { return x > hi ? hi : x; }

template <typename acc_t>
struct Coefficients { acc_t a, b; };
template <typename acc_t>
struct CoefficientsVjp { acc_t s, q, p; };

// max(beta_rank - 1, tiny) ** 0.5 / positions ** 0.5: Python-float (double) math in the spec.
template <typename acc_t>
SRNC_HOST_DEVICE inline acc_t paper_numerator(double beta_rank, double positions) {
  const double tiny = std::numeric_limits<acc_t>::min();
  return static_cast<acc_t>(std::sqrt(clamp_min(beta_rank - 1.0, tiny)) / std::sqrt(positions));
}

// (A, B) of out = A K + B V from the reductions s, q, p and the constants c0, c1. `variant` is
// validated by the caller (anything but 0 and 1 is taken as projected).
template <typename acc_t>
SRNC_HOST_DEVICE inline Coefficients<acc_t> coefficients(
    acc_t s, acc_t q, acc_t p, acc_t c0, acc_t c1,
    double alpha_, double beta_rank_, double positions, double eps_, int variant) {
  const acc_t tiny = std::numeric_limits<acc_t>::min(), one = 1, two = 2;
  const acc_t alpha = alpha_, beta_rank = beta_rank_, eps = eps_;
  const acc_t d = s + eps;
  if (variant == kVariantSN) return {alpha / d, acc_t(0)};
  if (variant == kVariantPaper) {
    const acc_t n2 = q / (d * d) - two * s / d + c0;  // ||K/d - S1||^2
    const acc_t norm = std::sqrt(clamp_min(n2, tiny));
    const acc_t numerator = paper_numerator<acc_t>(beta_rank_, positions);
    const acc_t gamma_c = clamp_max(numerator / norm, one);
    return {alpha * gamma_c / d, alpha * (one - gamma_c)};
  }
  const acc_t de = clamp_min(c0, tiny);
  const acc_t c = s / (d * de);
  const acc_t top = s * s / (d * d * de);  // ||W(S1)||_F^2
  const acc_t rest = (q - s * s / de) / (d * d);  // ||W(S2)||_F^2
  const acc_t gamma_c = clamp_max(std::sqrt(clamp_min(beta_rank - top, tiny)) / std::sqrt(clamp_min(rest, tiny)), one);
  const acc_t t = c * (one - gamma_c) * c1 + gamma_c * p / d;  // <K_rw, S1_out>
  const acc_t f = one / (t + eps);
  return {alpha * gamma_c * f / d, alpha * c * (one - gamma_c) * f};
}

// Reverse mode of coefficients: (dL/ds, dL/dq, dL/dp) given dL/dA = g_a, dL/dB = g_b.
template <typename acc_t>
SRNC_HOST_DEVICE inline CoefficientsVjp<acc_t> coefficients_vjp(
    acc_t s, acc_t q, acc_t p, acc_t c0, acc_t c1, acc_t g_a, acc_t g_b,
    double alpha_, double beta_rank_, double positions, double eps_, int variant) {
  const acc_t tiny = std::numeric_limits<acc_t>::min(), zero = 0, one = 1, two = 2;
  const acc_t alpha = alpha_, beta_rank = beta_rank_, eps = eps_;
  const acc_t d = s + eps;
  if (variant == kVariantSN) return {-g_a * alpha / (d * d), zero, zero};
  if (variant == kVariantPaper) {
    const acc_t n2 = q / (d * d) - two * s / d + c0;
    const acc_t norm = std::sqrt(clamp_min(n2, tiny));
    const acc_t numerator = paper_numerator<acc_t>(beta_rank_, positions);
    const acc_t gamma = numerator / norm;
    const acc_t gamma_c = clamp_max(gamma, one);
    const acc_t g_gamma_c = g_a * alpha / d - g_b * alpha;
    acc_t g_d = -g_a * alpha * gamma_c / (d * d);
    const acc_t g_gamma = gamma < one ? g_gamma_c : zero;
    const acc_t g_norm = -g_gamma * gamma / norm;
    const acc_t g_n2 = n2 > tiny ? g_norm / (two * norm) : zero;
    const acc_t g_q = g_n2 / (d * d);
    g_d = g_d + g_n2 * (-two * q / (d * d * d) + two * s / (d * d));
    const acc_t g_s = g_n2 * (-two / d) + g_d;
    return {g_s, g_q, zero};
  }
  const acc_t de = clamp_min(c0, tiny);
  const acc_t c = s / (d * de);
  const acc_t top = s * s / (d * d * de);
  const acc_t rest = (q - s * s / de) / (d * d);
  const acc_t num2 = beta_rank - top;
  const acc_t num = std::sqrt(clamp_min(num2, tiny));
  const acc_t den = std::sqrt(clamp_min(rest, tiny));
  const acc_t gamma = num / den;
  const acc_t gamma_c = clamp_max(gamma, one);
  const acc_t t = c * (one - gamma_c) * c1 + gamma_c * p / d;
  const acc_t f = one / (t + eps);
  // A = alpha gamma_c f / d ; B = alpha c (1 - gamma_c) f
  acc_t g_gamma_c = g_a * alpha * f / d - g_b * alpha * c * f;
  const acc_t g_f = g_a * alpha * gamma_c / d + g_b * alpha * c * (one - gamma_c);
  acc_t g_d = -g_a * alpha * gamma_c * f / (d * d);
  acc_t g_c = g_b * alpha * (one - gamma_c) * f;
  // f = 1 / (t + eps)
  const acc_t g_t = -g_f * f * f;
  // t = c (1 - gamma_c) c1 + gamma_c p / d
  g_c = g_c + g_t * (one - gamma_c) * c1;
  g_gamma_c = g_gamma_c + g_t * (p / d - c * c1);
  const acc_t g_p = g_t * gamma_c / d;
  g_d = g_d - g_t * gamma_c * p / (d * d);
  // gamma_c = min(num / den, 1)
  const acc_t g_gamma = gamma < one ? g_gamma_c : zero;
  const acc_t g_num2 = num2 > tiny ? g_gamma / den / (two * num) : zero;
  const acc_t g_rest = rest > tiny ? -g_gamma * num / (den * den) / (two * den) : zero;
  const acc_t g_top = -g_num2;
  // rest = (q - s^2/de) / d^2 ; top = s^2 / (d^2 de) ; c = s / (d de)
  const acc_t g_q = g_rest / (d * d);
  const acc_t g_s = g_rest * (-two * s / de) / (d * d) + g_top * two * s / (d * d * de) + g_c / (d * de);
  g_d = g_d - g_rest * two * (q - s * s / de) / (d * d * d) - g_top * two * s * s / (d * d * d * de) - g_c * s / (d * d * de);
  return {g_s + g_d, g_q, g_p};
}

// The floor tau > 0 on the sigma estimate s (coefficients.py): x = min(max(s, 0) / tau, 1),
// lambda = x^2, lambda' = 2 x / tau where x < 1 (else 0); A' = lambda A + (1 - lambda) alpha / tau,
// B' = lambda B, with (A, B) evaluated only where lambda > 0 (0 elsewhere: no 0 * inf).
template <typename acc_t>
struct FloorWeights { acc_t x, lam, dlam; };

template <typename acc_t>
SRNC_HOST_DEVICE inline FloorWeights<acc_t> floor_weights(acc_t s, acc_t tau) {
  const acc_t zero = 0, one = 1, two = 2;
  const acc_t x = clamp_max(clamp_min(s, zero) / tau, one);
  return {x, x * x, x < one ? two * x / tau : zero};
}

// alpha / tau in double (Python-float math in the spec), rounded once.
template <typename acc_t>
SRNC_HOST_DEVICE inline acc_t floor_base(double alpha, double tau) { return static_cast<acc_t>(alpha / tau); }

template <typename acc_t>
SRNC_HOST_DEVICE inline Coefficients<acc_t> floored_coefficients(
    acc_t s, acc_t q, acc_t p, acc_t c0, acc_t c1,
    double alpha, double beta_rank, double positions, double eps, int variant, double floor_) {
  Coefficients<acc_t> c = coefficients<acc_t>(s, q, p, c0, c1, alpha, beta_rank, positions, eps, variant);
  if (!(floor_ > 0)) return c;
  const acc_t zero = 0, one = 1, tau = floor_, base = floor_base<acc_t>(alpha, floor_);
  const FloorWeights<acc_t> w = floor_weights(s, tau);
  const bool live = w.lam > zero;
  const acc_t a = live ? c.a : zero, b = live ? c.b : zero;
  return {w.lam * a + (one - w.lam) * base, w.lam * b};
}

template <typename acc_t>
SRNC_HOST_DEVICE inline CoefficientsVjp<acc_t> floored_coefficients_vjp(
    acc_t s, acc_t q, acc_t p, acc_t c0, acc_t c1, acc_t g_a, acc_t g_b,
    double alpha, double beta_rank, double positions, double eps, int variant, double floor_) {
  if (!(floor_ > 0)) return coefficients_vjp<acc_t>(s, q, p, c0, c1, g_a, g_b, alpha, beta_rank, positions, eps, variant);
  const acc_t zero = 0, one = 1, tau = floor_, base = floor_base<acc_t>(alpha, floor_);
  const FloorWeights<acc_t> w = floor_weights(s, tau);
  const bool live = w.lam > zero;
  const Coefficients<acc_t> c = coefficients<acc_t>(s, q, p, c0, c1, alpha, beta_rank, positions, eps, variant);
  const acc_t a = live ? c.a : zero, b = live ? c.b : zero;
  const CoefficientsVjp<acc_t> g =
      coefficients_vjp<acc_t>(s, q, p, c0, c1, w.lam * g_a, w.lam * g_b, alpha, beta_rank, positions, eps, variant);
  const acc_t g_s = live ? g.s : zero, g_q = live ? g.q : zero, g_p = live ? g.p : zero;
  const acc_t g_lam = w.x < one ? g_a * (a - base) + g_b * b : zero;  // dL/dlambda; lambda' = 0 at s >= tau
  return {g_s + w.dlam * g_lam, g_q, g_p};
}

// ---- The ops, as plain structs of pointers and sizes (contiguous tensors) ----

// normalize_segments: x, fallback, out (rows, layers, inner), contiguous; layer l's segment is
// x[:, l, :] (n = rows * inner elements; rows = 1 is the (layers, n) case). out_l = x_l / ||x_l||
// where ||x_l|| > eps, else fallback_l. (rows, layers, inner) is how a channels-last stack of L
// layers' vectors lies in memory: (H * W, L, C).
template <typename scalar_t, typename acc_t_>
struct NormalizeOp {
  using acc_t = acc_t_;
  static constexpr int kSums = 1;
  const scalar_t *x, *fallback;
  scalar_t* out;
  int64_t layers, n, inner;
  double eps;

  SRNC_HOST_DEVICE int64_t size() const { return n; }
  SRNC_HOST_DEVICE int64_t rows() const { return inner ? n / inner : 0; }
  // Memory offset of element i of layer l's segment.
  SRNC_HOST_DEVICE int64_t offset(int64_t l, int64_t i) const {
    if (inner == n) return l * n + i;  // the (layers, n) case, without the division
    const int64_t r = i / inner;
    return (r * layers + l) * inner + (i - r * inner);
  }
  SRNC_HOST_DEVICE bool keep(acc_t norm) const { return norm > acc_t(eps); }
  // The normalized value of x where keep(norm); the fallback's value otherwise.
  SRNC_HOST_DEVICE scalar_t value(scalar_t v, acc_t norm) const {
    return static_cast<scalar_t>(static_cast<acc_t>(v) / clamp_min(norm, acc_t(eps)));
  }
  SRNC_HOST_DEVICE void accumulate(int64_t l, int64_t i, acc_t* sums) const {
    const acc_t v = static_cast<acc_t>(x[offset(l, i)]);
    sums[0] += v * v;
  }
  SRNC_HOST_DEVICE acc_t scalars(int64_t, const acc_t* sums) const { return std::sqrt(sums[0]); }
  SRNC_HOST_DEVICE void record(int64_t, const acc_t*) const {}
  SRNC_HOST_DEVICE void write(int64_t l, int64_t i, acc_t norm) const {
    const int64_t j = offset(l, i);
    out[j] = keep(norm) ? value(x[j], norm) : fallback[j];
  }
};

// Inputs of both reweight ops. kernel, s1, direction, s1_out, grad, out: (layers, slices, taps);
// gram (taps, taps), consts (layers, 2), stats (layers, 3) in the accumulation type.
template <typename scalar_t, typename acc_t_>
struct ReweightArgs {
  using acc_t = acc_t_;
  const scalar_t *kernel, *s1, *direction, *s1_out;
  const acc_t *gram, *consts;
  scalar_t* out;  // forward: the reweighted kernel; backward: dL/dK
  int64_t layers, slices, taps;
  double alpha, beta_rank, positions, eps;
  int variant;
  double floor;  // tau >= 0; 0: no floor

  SRNC_HOST_DEVICE int64_t size() const { return slices * taps; }
  SRNC_HOST_DEVICE bool projected() const { return variant == kVariantProjected; }
  SRNC_HOST_DEVICE acc_t at(const scalar_t* x, int64_t l, int64_t i) const { return static_cast<acc_t>(x[l * size() + i]); }
  // (K_l G)[i] for the projected variant (kernel @ gram: slice row times G's column t), else K_l[i].
  SRNC_HOST_DEVICE acc_t gram_kernel(int64_t l, int64_t i) const {
    if (!projected()) return at(kernel, l, i);
    const int64_t t = i % taps, row = i - t;
    acc_t acc = 0;
    for (int64_t j = 0; j < taps; ++j) acc += at(kernel, l, row + j) * gram[j * taps + t];
    return acc;
  }
  SRNC_HOST_DEVICE Coefficients<acc_t> coeffs(int64_t l, acc_t s, acc_t q, acc_t p) const {
    return floored_coefficients<acc_t>(s, q, p, consts[2 * l], consts[2 * l + 1], alpha, beta_rank, positions, eps,
                                       variant, floor);
  }
};

// reweight_forward: sums (s, q, p) = (<K, S1>, <K, G K> or ||K||^2, <K, S1_out> or 0);
// out = A K + B V; stats_out (layers, 3) = (s, q, p).
template <typename scalar_t, typename acc_t_>
struct ReweightForwardOp : ReweightArgs<scalar_t, acc_t_> {
  using acc_t = acc_t_;
  static constexpr int kSums = 3;
  acc_t* stats_out;

  SRNC_HOST_DEVICE void accumulate(int64_t l, int64_t i, acc_t* sums) const {
    const acc_t k = this->at(this->kernel, l, i);
    sums[0] += k * this->at(this->s1, l, i);
    sums[1] += this->gram_kernel(l, i) * k;
    if (this->projected()) sums[2] += k * this->at(this->s1_out, l, i);
  }
  SRNC_HOST_DEVICE Coefficients<acc_t> scalars(int64_t l, const acc_t* sums) const {
    return this->coeffs(l, sums[0], sums[1], sums[2]);
  }
  SRNC_HOST_DEVICE void record(int64_t l, const acc_t* sums) const {
    for (int k = 0; k < 3; ++k) stats_out[3 * l + k] = sums[k];
  }
  SRNC_HOST_DEVICE void write(int64_t l, int64_t i, const Coefficients<acc_t>& c) const {
    this->out[l * this->size() + i] =
        static_cast<scalar_t>(c.a * this->at(this->kernel, l, i) + c.b * this->at(this->direction, l, i));
  }
};

// Per-layer scalars of the backward: dL/dK = A g + g_s S1 + (2 g_q) G K + g_p S1_out.
template <typename acc_t>
struct BackwardScalars { acc_t a, g_s, g_q2, g_p; };

// reweight_backward: sums (g_A, g_B) = (<g, K>, <g, V>), then the closed-form dL/dK.
template <typename scalar_t, typename acc_t_>
struct ReweightBackwardOp : ReweightArgs<scalar_t, acc_t_> {
  using acc_t = acc_t_;
  static constexpr int kSums = 2;
  const scalar_t* grad;
  const acc_t* stats;

  SRNC_HOST_DEVICE void accumulate(int64_t l, int64_t i, acc_t* sums) const {
    const acc_t g = this->at(grad, l, i);
    sums[0] += g * this->at(this->kernel, l, i);
    sums[1] += g * this->at(this->direction, l, i);
  }
  SRNC_HOST_DEVICE BackwardScalars<acc_t> scalars(int64_t l, const acc_t* sums) const {
    const acc_t s = stats[3 * l], q = stats[3 * l + 1], p = stats[3 * l + 2];
    const acc_t a = this->coeffs(l, s, q, p).a;
    const CoefficientsVjp<acc_t> g = floored_coefficients_vjp<acc_t>(
        s, q, p, this->consts[2 * l], this->consts[2 * l + 1], sums[0], sums[1],
        this->alpha, this->beta_rank, this->positions, this->eps, this->variant, this->floor);
    return {a, g.s, acc_t(2) * g.q, g.p};
  }
  SRNC_HOST_DEVICE void record(int64_t, const acc_t*) const {}
  SRNC_HOST_DEVICE void write(int64_t l, int64_t i, const BackwardScalars<acc_t>& c) const {
    acc_t v = c.a * this->at(grad, l, i) + c.g_s * this->at(this->s1, l, i) + c.g_q2 * this->gram_kernel(l, i);
    if (this->projected()) v = v + c.g_p * this->at(this->s1_out, l, i);
    this->out[l * this->size() + i] = static_cast<scalar_t>(v);
  }
};

// CUDA backend (srnc_ops_cuda.cu, built with -DSRNC_WITH_CUDA): one launch, one block per layer,
// on the current stream of `device`; instantiated for the ops above over float, double, Half, BFloat16.
template <class Op>
void run_layerwise_cuda(const Op& op, int device);

}  // namespace srnc
