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

template <class T>
void pool2x2_forward(const T* x, int64_t planes, int64_t H, int64_t W, T* out) {
  SAN_PHASE(kAggregate);
  const int64_t h = H / 2, w = W / 2;
  torch::stable::parallel_for(0, planes * h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* r0 = x + (row / h * H + 2 * (row % h)) * W;
      const T* r1 = r0 + W;
      T* o = out + row * w;
      for (int64_t j = 0; j < w; ++j) {
        const T a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
        T m = a;
        if (b > m || (b != b && m == m)) m = b;
        if (c > m || (c != c && m == m)) m = c;
        if (d > m || (d != d && m == m)) m = d;
        o[j] = m;
      }
    }
  });
}

template <class T>
void pool2x2_backward(const T* grad, const T* x, int64_t planes, int64_t H, int64_t W, T* grad_x) {
  SAN_PHASE(kScatter);
  const int64_t h = H / 2, w = W / 2;
  torch::stable::parallel_for(0, planes * h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / h, i = row % h;
      const T* r0 = x + (plane * H + 2 * i) * W;
      const T* r1 = r0 + W;
      T* g0 = grad_x + (plane * H + 2 * i) * W;
      T* g1 = g0 + W;
      const T* g = grad + row * w;
      for (int64_t j = 0; j < w; ++j) {
        const T a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
        // MaxPool2d's winner: the first maximum in row-major order, a NaN taking it from a number
        T m = a;
        int win = 0;
        if (b > m || (b != b && m == m)) { m = b; win = 1; }
        if (c > m || (c != c && m == m)) { m = c; win = 2; }
        if (d > m || (d != d && m == m)) { m = d; win = 3; }
        const T v = g[j];
        g0[2 * j] = win == 0 ? v : T(0);
        g0[2 * j + 1] = win == 1 ? v : T(0);
        g1[2 * j] = win == 2 ? v : T(0);
        g1[2 * j + 1] = win == 3 ? v : T(0);
      }
      if (W % 2) g0[W - 1] = g1[W - 1] = T(0);  // the dropped last column
      if (H % 2 && i == h - 1) std::fill(g1 + W, g1 + 2 * W, T(0));  // the dropped last row
    }
  });
}

// The stem on a batch: out = relu(max over each window of (matrix . x + shift)) (B, O, H/2, W/2), and, given argmax,
// each window's winner per channel (uint8, 0..3 row-major). matrix (O x C) and shift (O) hold the BatchNorm folded in.
// Rows of the pooled map in parallel; each row's window pixels gathered by phase once, then every channel vectorised
// over the row (the max and the winner by selects: the first maximum, a NaN winning).
template <class T>
void stem_pooled(const T* x, int64_t B, int64_t C, int64_t H, int64_t W, const T* matrix, const T* shift,
                 int64_t O, T* out, uint8_t* argmax) {
  SAN_PHASE(kPack);
  typedef vec_t<T> vt;
  constexpr int L = Vec<T>::lanes;
  const int64_t h = H / 2, w = W / 2, wv = padded_lanes<T>(w);
  torch::stable::parallel_for(0, B * h, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> phase(4 * C * wv), row(wv), winner(wv);
    std::fill(phase.ptr(), phase.ptr() + 4 * C * wv, T(0));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / h, i = r % h;
      for (int64_t c = 0; c < C; ++c)
        for (int p = 0; p < 4; ++p) {
          const T* src = x + ((b * C + c) * H + 2 * i + p / 2) * W + (p & 1);
          T* dst = phase.ptr() + (p * C + c) * wv;
          for (int64_t j = 0; j < w; ++j) dst[j] = src[2 * j];
        }
      for (int64_t o = 0; o < O; ++o) {
        for (int64_t q = 0; q < wv; q += L) {
          vt best = splat<T>(T(0)), arg = splat<T>(T(0));
          for (int p = 0; p < 4; ++p) {
            vt y = splat<T>(shift[o]);
            for (int64_t c = 0; c < C; ++c) y += load<T>(phase.ptr() + (p * C + c) * wv + q) * matrix[o * C + c];
            if (p == 0) {
              best = y;
              continue;
            }
            // y wins where it is larger, or a NaN where the best so far is not
            const auto wins = (y > best) | ((y != y) & (best == best));
            best = wins ? y : best;
            arg = wins ? splat<T>(T(p)) : arg;
          }
          store<T>(row.ptr() + q, (best > splat<T>(T(0))) | (best != best) ? best : splat<T>(T(0)));
          store<T>(winner.ptr() + q, arg);
        }
        std::memcpy(out + ((b * O + o) * h + i) * w, row.ptr(), w * sizeof(T));
        if (argmax) {
          uint8_t* a = argmax + ((b * O + o) * h + i) * w;
          for (int64_t j = 0; j < w; ++j) a[j] = uint8_t(winner.ptr()[j]);
        }
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
