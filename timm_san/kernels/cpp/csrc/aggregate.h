// The aggregation out[c] = sum_j w[j][c % Cw] * x[c][neighbour j] on one tile, forward and backward, and the
// pairwise softmax over the footprint. Weights come per offset j as (Cw x lanes) rows of a tile buffer; the
// aggregation runs on the row-extended grid of the padded map, where every offset's neighbours are one contiguous
// run (see Tile), with the weights copied onto that grid (zeros in the gaps).
#pragma once

#include <algorithm>
#include <vector>

#include "plan.h"

namespace san {

// Geometry shared by the aggregation's loops
struct AggregationShape {
  int64_t channels, weight_channels, kernel_size, offsets, padded_height, padded_width;
  std::vector<int64_t> shift;  // offset j's neighbour on the padded map, relative to the footprint's corner

  AggregationShape(int64_t channels_, int64_t weight_channels_, int64_t kernel_size_, int64_t padded_height_,
                   int64_t padded_width_)
      : channels(channels_), weight_channels(weight_channels_), kernel_size(kernel_size_),
        offsets(kernel_size_ * kernel_size_), padded_height(padded_height_), padded_width(padded_width_) {
    for (int64_t j = 0; j < offsets; ++j) shift.push_back(j / kernel_size * padded_width + j % kernel_size);
  }
};

// tile rows (lanes of a compact row, stride ld) onto the extended grid (stride ext_ld), optionally scaled lane by
// lane, gaps and tail zeroed. Whole vectors per tile row: the vector that runs past a row spills into the gap
// after it (then zeroed) and into the next row (then written) or the buffer row's slack.
template <class T>
void to_extended(const T* compact, int64_t ld, T* ext, int64_t ext_ld, int64_t rows_count, const Tile& t, int64_t Wp,
                 const T* scale = nullptr) {
  SAN_PHASE(kLayout);
  constexpr int L = Vec<T>::lanes;
  const int64_t next = t.extended(Wp), nextv = padded_lanes<T>(next);
  for (int64_t r = 0; r < rows_count; ++r) {
    const T* src = compact + r * ld;
    T* dst = ext + r * ext_ld;
    for (int64_t rr = 0; rr < t.rows; ++rr) {
      for (int64_t q = 0; q < t.len; q += L) {
        vec_t<T> v = load<T>(src + rr * t.len + q);
        if (scale) v *= load<T>(scale + rr * t.len + q);
        store<T>(dst + rr * Wp + q, v);
      }
      if (rr + 1 < t.rows) std::fill(dst + rr * Wp + t.len, dst + (rr + 1) * Wp, T(0));
    }
    for (int64_t q = next; q < nextv; ++q) dst[q] = T(0);
  }
}

// exponentials of x[j * step] minus their max over j, in place, and 1 / their sum into inv (n lanes)
template <class T>
void softmax_exp(T* x, int64_t offsets, int64_t step, int64_t n, T* inv) {
  SAN_PHASE(kSoftmax);
  typedef vec_t<T> vt;
  constexpr int L = Vec<T>::lanes;
  for (int64_t q = 0; q < n; q += L) {
    vt m = load<T>(x + q);
    for (int64_t j = 1; j < offsets; ++j) m = vmax<T>(m, load<T>(x + j * step + q));
    vt sum = splat<T>(T(0));
    for (int64_t j = 0; j < offsets; ++j) {
      const vt e = exp_nonpositive<T>(load<T>(x + j * step + q) - m);
      store<T>(x + j * step + q, e);
      sum += e;
    }
    store<T>(inv + q, T(1) / sum);
  }
}

// softmax over the offsets of each (weight channel, lane): w[j][cw][q], rows j * stride + cw. In place; or, given
// ext, written onto the extended grid of tile t instead (rows j * Cw + cw, stride ext_ld), w left unnormalised.
template <class T>
void softmax_offsets(T* w, int64_t offsets, int64_t weight_channels, int64_t stride, int64_t ld, int64_t n,
                     T* ext = nullptr, int64_t ext_ld = 0, const Tile* t = nullptr, int64_t Wp = 0) {
  if (ext) {
    // the exponentials in place, their reciprocal sums per lane, and the scaled copy onto the grid
    T* inv = w + offsets * stride * ld;  // a spare row past the weights (see PairScratch)
    for (int64_t cw = 0; cw < weight_channels; ++cw) {
      softmax_exp(w + cw * ld, offsets, stride * ld, n, inv);
      for (int64_t j = 0; j < offsets; ++j)
        to_extended(w + (j * stride + cw) * ld, ld, ext + (j * weight_channels + cw) * ext_ld, ext_ld, 1, *t, Wp,
                    inv);
    }
    return;
  }
  SAN_PHASE(kSoftmax);
  typedef vec_t<T> vt;
  constexpr int L = Vec<T>::lanes;
  for (int64_t cw = 0; cw < weight_channels; ++cw)
    for (int64_t q = 0; q < n; q += L) {
      T* base = w + cw * ld + q;
      vt m = load<T>(base);
      for (int64_t j = 1; j < offsets; ++j) m = vmax<T>(m, load<T>(base + j * stride * ld));
      vt sum = splat<T>(T(0));
      for (int64_t j = 0; j < offsets; ++j) {
        const vt e = exp_nonpositive<T>(load<T>(base + j * stride * ld) - m);
        store<T>(base + j * stride * ld, e);
        sum += e;
      }
      const vt inv = T(1) / sum;
      for (int64_t j = 0; j < offsets; ++j) store<T>(base + j * stride * ld, load<T>(base + j * stride * ld) * inv);
    }
}

// softmax backward in place: g[j] <- w[j] * (g[j] - sum_j w[j] g[j])
template <class T>
void softmax_offsets_backward(const T* w, T* g, int64_t offsets, int64_t weight_channels, int64_t stride, int64_t ld,
                              int64_t n) {
  SAN_PHASE(kSoftmax);
  typedef vec_t<T> vt;
  constexpr int L = Vec<T>::lanes;
  for (int64_t cw = 0; cw < weight_channels; ++cw)
    for (int64_t q = 0; q < n; q += L) {
      const T* wb = w + cw * ld + q;
      T* gb = g + cw * ld + q;
      vt dot = splat<T>(T(0));
      for (int64_t j = 0; j < offsets; ++j) dot += load<T>(wb + j * stride * ld) * load<T>(gb + j * stride * ld);
      for (int64_t j = 0; j < offsets; ++j) {
        const vt wv = load<T>(wb + j * stride * ld);
        store<T>(gb + j * stride * ld, wv * (load<T>(gb + j * stride * ld) - dot));
      }
    }
}

template <class T>
void from_extended(const T* ext, int64_t ext_ld, T* compact, int64_t ld, int64_t rows_count, const Tile& t,
                   int64_t Wp) {
  SAN_PHASE(kLayout);
  const int64_t lanes = t.lanes(), n = padded_lanes<T>(lanes);
  for (int64_t r = 0; r < rows_count; ++r) {
    for (int64_t rr = 0; rr < t.rows; ++rr)
      std::memcpy(compact + r * ld + rr * t.len, ext + r * ext_ld + rr * Wp, t.len * sizeof(T));
    std::fill(compact + r * ld + lanes, compact + r * ld + n, T(0));
  }
}

// the (channels x extended lanes) rows of a map's tile, gaps zeroed: a gradient read on the extended grid
template <class T>
void map_to_extended(const MapView<T>& x, const Tile& t, int64_t Wp, T* ext, int64_t ext_ld) {
  SAN_PHASE(kLayout);
  const int64_t next = t.extended(Wp), nextv = padded_lanes<T>(next);
  for (int64_t c = 0; c < x.channels; ++c) {
    T* dst = ext + c * ext_ld;
    for (int64_t rr = 0; rr < t.rows; ++rr) {
      std::memcpy(dst + rr * Wp, x.plane(t.b, c) + (t.h0 + rr) * x.width + t.w0, t.len * sizeof(T));
      if (rr + 1 < t.rows) std::fill(dst + rr * Wp + t.len, dst + (rr + 1) * Wp, T(0));
    }
    std::fill(dst + next, dst + nextv, T(0));
  }
}

// Rows of a tile's weights on the extended grid: offset j, weight channel cw at data + (j * js + cw * cs) * ld
template <class T>
struct WeightRows {
  const T* data;
  int64_t ld, js, cs;
  const T* row(int64_t j, int64_t cw) const { return data + (j * js + cw * cs) * ld; }
};

// GB channels of weight channel cw (groups g0..g0 + GB) of the tile: sums over the offsets in registers
template <class T, int GB>
void aggregate_channels(const AggregationShape& s, const Tile& t, const T* xp, const WeightRows<T>& w, int64_t cw,
                        int64_t g0, int64_t gb, T* out, int64_t H, int64_t W, T* scratch) {
  typedef vec_t<T> vt;
  constexpr int L = Vec<T>::lanes;
  const int64_t Wp = s.padded_width, Hp = s.padded_height, C = s.channels, Cw = s.weight_channels;
  const int64_t KK = s.offsets;
  const int64_t nextv = padded_lanes<T>(t.extended(Wp));
  const T* base[GB];
  T* dst[GB];
  for (int64_t g = 0; g < GB; ++g) {
    const int64_t c = (g0 + std::min<int64_t>(g, gb - 1)) * Cw + cw;
    base[g] = xp + ((t.b * C + c) * Hp + t.h0) * Wp + t.w0;
    dst[g] = out + ((t.b * C + c) * H + t.h0) * W + t.w0;
  }
  // one tile row (the extended grid is the row itself): whole vectors straight into the map, the last via scratch
  const bool direct = t.rows == 1;
  for (int64_t q = 0; q < nextv; q += L) {
    vt acc[GB];
    for (int g = 0; g < GB; ++g) acc[g] = splat<T>(T(0));
    for (int64_t j = 0; j < KK; ++j) {
      const int64_t off = s.shift[j] + q;
      const vt wv = load<T>(w.row(j, cw) + q);
      for (int g = 0; g < GB; ++g) acc[g] += wv * load<T>(base[g] + off);
    }
    for (int64_t g = 0; g < gb; ++g) {
      if (direct && q + L <= t.len) store<T>(dst[g] + q, acc[g]);
      else store<T>(scratch + g * nextv + q, acc[g]);
    }
  }
  for (int64_t g = 0; g < gb; ++g) {
    if (direct) {
      const int64_t done = t.len / L * L;
      std::memcpy(dst[g] + done, scratch + g * nextv + done, (t.len - done) * sizeof(T));
      continue;
    }
    for (int64_t rr = 0; rr < t.rows; ++rr)
      std::memcpy(dst[g] + rr * W, scratch + g * nextv + rr * Wp, t.len * sizeof(T));
  }
}

// out rows of the tile (map (B, C, H, W), contiguous) = aggregation of the padded x with the tile's weights on the
// extended grid. Up to eight channels sharing a weight channel at once, each weight loaded once for all of them.
template <class T>
void aggregate_tile(const AggregationShape& s, const Tile& t, const T* xp, const WeightRows<T>& w, T* out, int64_t H,
                    int64_t W, T* scratch) {
  SAN_PHASE(kAggregate);
  const int64_t groups = s.channels / s.weight_channels;
  for (int64_t cw = 0; cw < s.weight_channels; ++cw)
    for (int64_t g0 = 0; g0 < groups;) {
      const int64_t gb = std::min<int64_t>(groups - g0, groups >= 8 ? 8 : 4);
      if (gb > 4) aggregate_channels<T, 8>(s, t, xp, w, cw, g0, gb, out, H, W, scratch);
      else aggregate_channels<T, 4>(s, t, xp, w, cw, g0, gb, out, H, W, scratch);
      g0 += gb;
    }
}

// weight gradient of the aggregation on the extended grid: gw_ext[j][cw] = sum over c of weight channel cw of
// grad_ext[c] * x[c][neighbour j]
template <class T>
void aggregate_weight_grad(const AggregationShape& s, const Tile& t, const T* xp, const T* grad_ext,
                           int64_t ext_ld, T* gw_ext) {
  SAN_PHASE(kAggregateGrad);
  typedef vec_t<T> vt;
  constexpr int L = Vec<T>::lanes;
  const int64_t Wp = s.padded_width, Hp = s.padded_height, C = s.channels, Cw = s.weight_channels;
  const int64_t groups = C / Cw, KK = s.offsets;
  const int64_t nextv = padded_lanes<T>(t.extended(Wp));
  for (int64_t cw = 0; cw < Cw; ++cw)
    for (int64_t q = 0; q < nextv; q += L) {
      for (int64_t j = 0; j < KK; ++j) store<T>(gw_ext + (j * Cw + cw) * ext_ld + q, splat<T>(T(0)));
      for (int64_t g0 = 0; g0 < groups; g0 += 4) {
        const int64_t gb = std::min<int64_t>(4, groups - g0);
        vt gv[4];
        const T* base[4];
        for (int64_t g = 0; g < 4; ++g) {
          const int64_t c = (g0 + std::min(g, gb - 1)) * Cw + cw;
          gv[g] = g < gb ? load<T>(grad_ext + c * ext_ld + q) : splat<T>(T(0));
          base[g] = xp + ((t.b * C + c) * Hp + t.h0) * Wp + t.w0 + q;
        }
        for (int64_t j = 0; j < KK; ++j) {
          const int64_t off = s.shift[j];
          T* dst = gw_ext + (j * Cw + cw) * ext_ld + q;
          vt acc = load<T>(dst);
          acc += gv[0] * load<T>(base[0] + off) + gv[1] * load<T>(base[1] + off) + gv[2] * load<T>(base[2] + off) +
                 gv[3] * load<T>(base[3] + off);
          store<T>(dst, acc);
        }
      }
    }
}

// input gradient of the aggregation, scattered onto a band canvas (C x canvas rows x Wp, first row = band's h0):
// canvas[c][neighbour j] += w_ext[j][cw] * grad_ext[c]
template <class T>
void aggregate_input_grad(const AggregationShape& s, const Tile& t, int64_t band_h0, const T* w_ext,
                          const T* grad_ext, int64_t ext_ld, T* canvas, int64_t canvas_rows) {
  SAN_PHASE(kScatter);
  constexpr int L = Vec<T>::lanes;
  const int64_t Wp = s.padded_width, C = s.channels, Cw = s.weight_channels, KK = s.offsets;
  const int64_t next = t.extended(Wp);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t cw = c % Cw;
    const T* gv = grad_ext + c * ext_ld;
    T* base = canvas + (c * canvas_rows + t.h0 - band_h0) * Wp + t.w0;
    for (int64_t j = 0; j < KK; ++j) {
      const T* wv = w_ext + (j * Cw + cw) * ext_ld;
      T* dst = base + s.shift[j];
      // the last vector masked: the canvas is the thread's own, what lies past the tile is written back unchanged
      for (int64_t q = 0; q < next; q += L)
        store<T>(dst + q, load<T>(dst + q) + keep_head<T>(load<T>(wv + q) * load<T>(gv + q), next - q));
    }
  }
}

}  // namespace san
