// SAN's 2x2 max-pools and its stem (1x1 conv, BatchNorm, ReLU, 2x2 max-pool) on CPU, planes or rows in parallel.
//
// MaxPool2d's rules are kept: floor mode (an odd last row or column is dropped), a NaN in a window wins it, else
// its first maximum in row-major order. The pool's backward finds each window's winner again from the input, so
// training keeps the input only (no indices). The stem writes only the pooled map: the ReLU commutes with the max,
// so the maximum over the four pixels of a window is taken on the conv's (affine) outputs.
#pragma once

#include <cmath>
#include <vector>

#include "plan.h"

namespace san {

// the position (0..3, row-major) of the winner of a window's four values, by MaxPool2d's rule
template <class T>
inline int window_winner(T v0, T v1, T v2, T v3) {
  const T v[4] = {v0, v1, v2, v3};
  int best = 0;
  T m = v0;
  for (int i = 1; i < 4; ++i)
    if (v[i] > m || std::isnan(v[i])) {
      m = v[i];
      best = i;
    }
  return best;
}

template <class T>
void pool2x2_forward(const T* x, int64_t planes, int64_t H, int64_t W, T* out) {
  const int64_t h = H / 2, w = W / 2;
  torch::stable::parallel_for(0, planes * h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* r0 = x + (row / h * H + 2 * (row % h)) * W;
      const T* r1 = r0 + W;
      T* o = out + row * w;
      for (int64_t j = 0; j < w; ++j) {
        const T a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
        T m = a;
        if (b > m || std::isnan(b)) m = b;
        if (c > m || std::isnan(c)) m = c;
        if (d > m || std::isnan(d)) m = d;
        o[j] = m;
      }
    }
  });
}

template <class T>
void pool2x2_backward(const T* grad, const T* x, int64_t planes, int64_t H, int64_t W, T* grad_x) {
  const int64_t h = H / 2, w = W / 2;
  torch::stable::parallel_for(0, planes * h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / h, i = row % h;
      const T* r0 = x + (plane * H + 2 * i) * W;
      const T* r1 = r0 + W;
      T* g0 = grad_x + (plane * H + 2 * i) * W;
      T* g1 = g0 + W;
      const T* g = grad + row * w;
      std::fill(g0, g0 + 2 * W, T(0));  // both rows, and the dropped last column
      for (int64_t j = 0; j < w; ++j) {
        const int win = window_winner(r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]);
        (win < 2 ? g0 : g1)[2 * j + (win & 1)] = g[j];
      }
      if (H % 2 && i == h - 1) std::fill(g1 + W, g1 + 2 * W, T(0));  // the dropped last row
    }
  });
}

// The stem on a batch: out = relu(max over each window of (matrix . x + shift)) (B, O, H/2, W/2), and, given argmax,
// each window's winner per channel (uint8, 0..3 row-major). matrix (O x C) and shift (O) hold the BatchNorm folded in.
template <class T>
void stem_pooled(const T* x, int64_t B, int64_t C, int64_t H, int64_t W, const T* matrix, const T* shift,
                  int64_t O, T* out, uint8_t* argmax) {
  const int64_t h = H / 2, w = W / 2;
  torch::stable::parallel_for(0, B * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> phase(4 * C * w), y(w);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / h, i = row % h;
      // the four pixels of every window of this pooled row, per input channel: phase[(p * C + c) * w + j]
      for (int64_t c = 0; c < C; ++c)
        for (int p = 0; p < 4; ++p) {
          const T* src = x + ((b * C + c) * H + 2 * i + p / 2) * W + (p & 1);
          T* dst = phase.data() + (p * C + c) * w;
          for (int64_t j = 0; j < w; ++j) dst[j] = src[2 * j];
        }
      for (int64_t o = 0; o < O; ++o) {
        T* dst = out + ((b * O + o) * h + i) * w;
        uint8_t* arg = argmax ? argmax + ((b * O + o) * h + i) * w : nullptr;
        for (int p = 0; p < 4; ++p) {
          std::fill(y.begin(), y.end(), shift[o]);
          for (int64_t c = 0; c < C; ++c) {
            const T m = matrix[o * C + c];
            const T* src = phase.data() + (p * C + c) * w;
            for (int64_t j = 0; j < w; ++j) y[j] += m * src[j];
          }
          if (p == 0) {
            std::copy(y.begin(), y.end(), dst);
            if (arg) std::fill(arg, arg + w, uint8_t(0));
            continue;
          }
          for (int64_t j = 0; j < w; ++j)
            if (y[j] > dst[j] || (std::isnan(y[j]) && !std::isnan(dst[j]))) {
              dst[j] = y[j];
              if (arg) arg[j] = uint8_t(p);
            }
        }
        for (int64_t j = 0; j < w; ++j) dst[j] = dst[j] > T(0) || std::isnan(dst[j]) ? dst[j] : T(0);
      }
    }
  });
}

// The stem's backward over its winning pixels: with g = grad where out > 0, the moment sum over the batch of
// g[o] * (x[c] - mean[c]) at channel o's winner (O x C), sum g (O), and, given grad_x, folded^T g added to the
// winning pixels of x (B, C, H, W; zeroed here first).
template <class T>
void stem_pooled_backward(const T* grad, const T* x, const T* out, const uint8_t* argmax, int64_t B, int64_t C, int64_t H,
                   int64_t W, int64_t O, const T* mean, const T* folded, double* moment, double* grad_shift,
                   T* grad_x) {
  const int64_t h = H / 2, w = W / 2;
  Reduction red(O * C + O);
  if (grad_x) std::fill(grad_x, grad_x + B * C * H * W, T(0));
  torch::stable::parallel_for(0, B * h, 1, [&](int64_t begin, int64_t end) {
    double* acc = red.slot(begin);
    std::vector<T> phase(4 * C * w), gx(4 * C * w), gm(w), mom(C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / h, i = row % h;
      for (int64_t c = 0; c < C; ++c)
        for (int p = 0; p < 4; ++p) {
          const T* src = x + ((b * C + c) * H + 2 * i + p / 2) * W + (p & 1);
          T* dst = phase.data() + (p * C + c) * w;
          for (int64_t j = 0; j < w; ++j) dst[j] = src[2 * j] - mean[c];
        }
      std::fill(gx.begin(), gx.end(), T(0));
      for (int64_t o = 0; o < O; ++o) {
        const int64_t base = ((b * O + o) * h + i) * w;
        const T* g = grad + base;
        const T* y = out + base;
        const uint8_t* arg = argmax + base;
        std::fill(mom.begin(), mom.end(), T(0));
        T sum = 0;
        for (int64_t j = 0; j < w; ++j) {
          const T gj = y[j] > T(0) ? g[j] : T(0);
          gm[j] = gj;
          sum += gj;
        }
        for (int64_t c = 0; c < C; ++c) {
          T s = 0;
          for (int64_t j = 0; j < w; ++j) s += gm[j] * phase[(arg[j] * C + c) * w + j];
          mom[c] = s;
        }
        for (int64_t c = 0; c < C; ++c) acc[o * C + c] += mom[c];
        acc[O * C + o] += sum;
        if (grad_x)
          for (int64_t c = 0; c < C; ++c) {
            const T f = folded[o * C + c];
            for (int64_t j = 0; j < w; ++j) gx[(arg[j] * C + c) * w + j] += f * gm[j];
          }
      }
      if (grad_x)
        for (int64_t c = 0; c < C; ++c)
          for (int p = 0; p < 4; ++p) {
            T* dst = grad_x + ((b * C + c) * H + 2 * i + p / 2) * W + (p & 1);
            const T* src = gx.data() + (p * C + c) * w;
            for (int64_t j = 0; j < w; ++j) dst[2 * j] = src[j];
          }
    }
  });
  const std::vector<double> total = red.total();
  std::copy(total.begin(), total.begin() + O * C, moment);
  std::copy(total.begin() + O * C, total.end(), grad_shift);
}

}  // namespace san
