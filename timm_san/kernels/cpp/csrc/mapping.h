// SAM's weight mapping on a tile: L layers of (BatchNorm, ReLU, 1x1 conv), the BatchNorms as affine maps once their
// statistics are known (running ones in eval, batch ones in training), and what backward needs of each layer.
#pragma once

#include <cmath>
#include <vector>

#include "gemm.h"
#include "plan.h"

namespace san {

// Layer l maps a[l] (in[l] channels: relu(scale[l] * h[l - 1] + shift[l]), h[-1] the relation) to
// h[l] = W[l] a[l] + bias[l] (out[l] channels); h[L - 1] are the mapping's outputs (logits, weights).
template <class T>
struct Mapping {
  int64_t layers = 0;
  std::vector<int64_t> in, out;
  std::vector<Packed<T>> weight, weight_t;
  std::vector<std::vector<T>> bias;                 // padded rows, zeros where the conv has none
  std::vector<std::vector<T>> scale, shift;         // the norm before layer l: padded to whole panels of in[l]
  std::vector<std::vector<double>> mean, invstd;    // training: the batch statistics behind scale and shift

  // weights[l] (out x in, row-major), biases[l] or null
  void set_layers(const std::vector<const T*>& weights, const std::vector<const T*>& biases,
                  const std::vector<int64_t>& ins, const std::vector<int64_t>& outs) {
    layers = weights.size();
    in = ins;
    out = outs;
    for (int64_t l = 0; l < layers; ++l) {
      weight.emplace_back(weights[l], out[l], in[l], in[l], 1);
      weight_t.emplace_back(weights[l], in[l], out[l], 1, in[l]);
      bias.push_back(padded_vector<T>(biases[l], out[l]));
    }
    scale.resize(layers);
    shift.resize(layers);
    mean.resize(layers);
    invstd.resize(layers);
  }

  // the norm before layer l as the affine map of given statistics (gamma, beta may be null: not affine)
  void set_norm(int64_t l, const T* gamma, const T* beta, const double* mu, const double* inv) {
    const int64_t n = in[l];
    scale[l].assign(padded_rows(n), T(0));
    shift[l].assign(padded_rows(n), T(0));
    mean[l].assign(mu, mu + n);
    invstd[l].assign(inv, inv + n);
    for (int64_t c = 0; c < n; ++c) {
      const double s = inv[c] * (gamma ? double(gamma[c]) : 1.0);
      scale[l][c] = T(s);
      shift[l][c] = T((beta ? double(beta[c]) : 0.0) - mu[c] * s);
    }
  }

  // eval: the norm from running statistics and eps
  void set_running_norm(int64_t l, const T* gamma, const T* beta, const T* running_mean, const T* running_var,
                        double eps) {
    std::vector<double> mu(in[l]), inv(in[l]);
    for (int64_t c = 0; c < in[l]; ++c) {
      mu[c] = running_mean[c];
      inv[c] = 1.0 / std::sqrt(double(running_var[c]) + eps);
    }
    set_norm(l, gamma, beta, mu.data(), inv.data());
  }

  // training: the norm from batch sums (count, sum, sum of squares), biased variance as BatchNorm normalises
  void set_batch_norm(int64_t l, const T* gamma, const T* beta, const double* sums, double count, double eps) {
    const int64_t n = in[l];
    std::vector<double> mu(n), inv(n);
    for (int64_t c = 0; c < n; ++c) {
      mu[c] = sums[c] / count;
      const double var = std::max(0.0, sums[n + c] / count - mu[c] * mu[c]);
      inv[c] = 1.0 / std::sqrt(var + eps);
    }
    set_norm(l, gamma, beta, mu.data(), inv.data());
  }
};

// a[l + 1] = relu(scale * (W a[l] + b) + shift) for l < L - 1: the next norm folded into the product's epilogue
template <class T>
inline Epilogue<T> hidden_epilogue(const Mapping<T>& m, int64_t l) {
  Epilogue<T> ep;
  ep.bias = m.bias[l].data();
  ep.scale = m.scale[l + 1].data();
  ep.shift = m.shift[l + 1].data();
  return ep;
}

template <class T>
inline Epilogue<T> bias_epilogue(const Mapping<T>& m, int64_t l) {
  Epilogue<T> ep;
  ep.bias = m.bias[l].data();
  return ep;
}

// act = relu(scale * raw + shift) on rows x n lanes (row stride ld)
template <class T>
void normalize_relu(const T* raw, T* act, int64_t rows, int64_t n, int64_t ld, const T* scale, const T* shift) {
  SAN_PHASE(kPack);
  constexpr int L = Vec<T>::lanes;
  for (int64_t r = 0; r < rows; ++r) {
    const T s = scale[r], t = shift[r];
    for (int64_t q = 0; q < n; q += L) store<T>(act + r * ld + q, relu<T>(load<T>(raw + r * ld + q) * s + t));
  }
}

// ReLU backward in place: grad where the ReLU's output act is positive, else 0
template <class T>
void relu_mask(T* grad, const T* act, int64_t rows, int64_t n, int64_t ld) {
  constexpr int L = Vec<T>::lanes;
  const vec_t<T> zero = splat<T>(T(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < n; q += L)
      store<T>(grad + r * ld + q, load<T>(act + r * ld + q) > zero ? load<T>(grad + r * ld + q) : zero);
}

// sum and sum of squares of each row over the first `lanes` lanes, added to acc ([sum..., sumsq...] of `channels`
// channels; row r is channel channel[r], or r): vector sums over a tile (a few dozen lanes), double across tiles
template <class T>
void add_moments(const T* x, int64_t rows, int64_t lanes, int64_t ld, double* acc, int64_t channels,
                 const int64_t* channel = nullptr) {
  SAN_PHASE(kReduce);
  typedef vec_t<T> vt;
  constexpr int L = Vec<T>::lanes;
  for (int64_t r = 0; r < rows; ++r) {
    vt s = splat<T>(T(0)), s2 = s;
    const T* row = x + r * ld;
    for (int64_t q = 0; q < lanes; q += L) {
      const vt v = keep_head<T>(load<T>(row + q), lanes - q);
      s += v;
      s2 += v * v;
    }
    const int64_t k = channel ? channel[r] : r;
    acc[k] += lane_sum<T>(s);
    acc[channels + k] += lane_sum<T>(s2);
  }
}

// the backward of relu(scale * h + shift) into the norm's reductions: gz = grad_act where act > 0;
// sums[k] += sum gz, sums[n + k] += sum gz * hhat with hhat = (h - mean) * invstd, k the channel of row r
// (channel[r], or r); gz written over grad_act, times the norm's scale if scaled
template <class T>
void relu_norm_sums(T* grad_act, const T* act, const T* raw, int64_t rows, int64_t lanes, int64_t n, int64_t ld,
                    const Mapping<T>& m, int64_t l, double* sums, const int64_t* channel = nullptr,
                    bool scaled = false) {
  SAN_PHASE(kReduce);
  typedef vec_t<T> vt;
  constexpr int L = Vec<T>::lanes;
  const int64_t channels = m.in[l];
  const vt zero = splat<T>(T(0));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t k = channel ? channel[r] : r;
    T* g = grad_act + r * ld;
    const T* a = act + r * ld;
    const T* h = raw + r * ld;
    const T mu = T(m.mean[l][k]), out_scale = scaled ? m.scale[l][k] : T(1);
    vt s = zero, s2 = zero;
    for (int64_t q = 0; q < n; q += L) {
      const vt gz = load<T>(a + q) > zero ? load<T>(g + q) : zero;
      store<T>(g + q, gz * out_scale);
      const vt valid = keep_head<T>(gz, lanes - q);
      s += valid;
      s2 += valid * (load<T>(h + q) - mu);
    }
    sums[k] += lane_sum<T>(s);
    sums[channels + k] += double(lane_sum<T>(s2)) * m.invstd[l][k];
  }
}

// BatchNorm's input gradient once its reductions are known: grad_raw = scale * (gz - sum_gz / N - hhat *
// sum_gz_hhat / N), on the first `lanes` lanes (the rest zeroed)
template <class T>
void norm_input_grad(const T* gz, const T* raw, T* grad_raw, int64_t rows, int64_t lanes, int64_t n, int64_t ld,
                     const Mapping<T>& m, int64_t l, const std::vector<double>& sums, double count) {
  SAN_PHASE(kReduce);
  constexpr int L = Vec<T>::lanes;
  const int64_t channels = m.in[l];
  for (int64_t r = 0; r < rows; ++r) {
    const double inv = m.invstd[l][r], mu = m.mean[l][r];
    const double s = double(m.scale[l][r]);
    const double mean_g = sums[r] / count, coef = sums[channels + r] / count * inv;
    // grad = s * gz - s * mean_g - s * coef * (h - mu)
    const T a = T(s), b = T(-s * mean_g + s * coef * mu), c = T(-s * coef);
    const T* g = gz + r * ld;
    const T* h = raw + r * ld;
    T* out = grad_raw + r * ld;
    for (int64_t q = 0; q < n; q += L)
      store<T>(out + q, keep_head<T>(load<T>(g + q) * a + b + load<T>(h + q) * c, lanes - q));
  }
}

// The part of BatchNorm's input gradient that does not depend on its upstream gradient, alpha + beta * raw per
// channel: what is left of it once scale * gz has been propagated (see norm_input_grad)
template <class T>
void norm_correction(const Mapping<T>& m, int64_t l, const std::vector<double>& sums, double count,
                     std::vector<T>& alpha, std::vector<T>& beta) {
  const int64_t channels = m.in[l];
  alpha.assign(padded_rows(channels), T(0));
  beta.assign(padded_rows(channels), T(0));
  for (int64_t r = 0; r < channels; ++r) {
    const double inv = m.invstd[l][r], mu = m.mean[l][r], s = double(m.scale[l][r]);
    const double mean_g = sums[r] / count, coef = sums[channels + r] / count * inv;
    alpha[r] = T(-s * mean_g + s * coef * mu);
    beta[r] = T(-s * coef);
  }
}

// Weight gradients on a tile: c (rows x cols, float) (+)= a (rows x lanes) . b (cols x lanes)^T over the first
// `lanes` lanes, a product with b transposed; then added to a double accumulator once per tile (flush), so that a
// tile's sums (a few thousand terms) are float and the sums across tiles double.
template <class T>
struct OuterProduct {
  Buffer<T> packed, transposed, product;
  int64_t rows, cols, cols_padded;
  bool empty = true;

  OuterProduct(int64_t rows_, int64_t cols_, int64_t max_lanes)
      : packed(padded_rows(rows_) * max_lanes), transposed(max_lanes * padded_lanes<T>(cols_)),
        product(padded_rows(rows_) * padded_lanes<T>(cols_)), rows(rows_), cols(cols_),
        cols_padded(padded_lanes<T>(cols_)) {
    transposed.zero();  // columns past cols stay zero
  }

  // a, the left factor, for the next products
  void set_left(const T* a, int64_t lda, int64_t lanes) { pack_panels(packed.ptr(), a, rows, lanes, lda, 1); }

  // b (count x lanes), transposed into columns [col0, col0 + count) of the right factor
  void set_right(const T* b, int64_t ldb, int64_t count, int64_t lanes, int64_t col0 = 0) {
    transpose(b, count, lanes, ldb, transposed.ptr() + col0, cols_padded);
  }

  // c (+)= left . right over `lanes` lanes
  void multiply(int64_t lanes) {
    Epilogue<T> ep;
    ep.accumulate = !empty;
    gemm<T>(packed.ptr(), rows, lanes, transposed.ptr(), cols_padded, product.ptr(), cols_padded, cols_padded, ep);
    empty = false;
  }

  void add(const T* b, int64_t ldb, int64_t lanes) {
    set_right(b, ldb, cols, lanes);
    multiply(lanes);
  }

  // acc[r * acc_ld + column(c)] += c[r][c], then start over
  template <class Column>
  void flush(double* acc, int64_t acc_ld, Column column) {
    if (empty) return;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) acc[r * acc_ld + column(c)] += product.ptr()[r * cols_padded + c];
    empty = true;
  }
  void flush(double* acc) { flush(acc, cols, [](int64_t c) { return c; }); }
};

// sum over the first `lanes` lanes of each row, added to acc
template <class T>
void add_row_sums(const T* x, int64_t rows, int64_t lanes, int64_t ld, double* acc) {
  SAN_PHASE(kReduce);
  typedef vec_t<T> vt;
  constexpr int L = Vec<T>::lanes;
  for (int64_t r = 0; r < rows; ++r) {
    vt s = splat<T>(T(0));
    for (int64_t q = 0; q < lanes; q += L) s += keep_head<T>(load<T>(x + r * ld + q), lanes - q);
    acc[r] += lane_sum<T>(s);
  }
}

template <class T>
void zero_lanes(T* x, int64_t rows, int64_t from, int64_t to, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = from; q < to; ++q) x[r * ld + q] = T(0);
}

}  // namespace san
