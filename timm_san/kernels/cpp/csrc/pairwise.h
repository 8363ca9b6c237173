// Pairwise SAM on CPU: for every pixel and footprint offset j, the relation of x1 at the pixel and x2 at its
// neighbour (and of the position encoding), the weight mapping, a softmax over the footprint, and the aggregation
// of x3. One parallel loop per pass over bands of rows; a tile's relation, hidden layers and weights live in
// the owning thread's cache and nothing k * k-fold is written to memory.
//
// Training adds passes over the same loop: the statistics of each BatchNorm of the mapping (one pass each, the
// relation's from the relation alone), then the forward. Backward takes one pass per BatchNorm, from the top:
// each recomputes the mapping and carries the gradient down to the next norm, whose batch reductions it sums;
// a last pass adds the part of the first norm's input gradient that its reductions alone decide.
#pragma once

#include <vector>

#include "aggregate.h"
#include "mapping.h"

namespace san {

enum PairRelation : int64_t { kSubtraction = 0, kSummation = 1, kHadamard = 2, kConcatenation = 3, kDot = 4 };

inline int64_t pair_relation_channels(int64_t relation, int64_t planes) {
  return relation == kConcatenation ? 2 * planes : relation == kDot ? 1 : planes;
}

template <class T>
struct Pairwise {
  MapView<T> x1, x2, x3;      // (B, R, H, W), (B, R, H, W), (B, C, H, W)
  const T* position;          // (2, H, W) or null
  int64_t relation;
  int64_t B, R, C, H, W, ks, KK, pad, Hp, Wp;
  int64_t rel_channels, in_channels;  // relation channels, and with the position's two
  Plan plan;
  Buffer<T> x1p, x2p, x3p, posp;   // padded copies
  Mapping<T> map;
  int64_t Cw;
  AggregationShape agg;

  // lanes: lanes of the widest tile (a multiple of the vector width)
  Pairwise(MapView<T> x1_, MapView<T> x2_, MapView<T> x3_, const T* position_, int64_t relation_, int64_t ks_,
           int64_t weight_channels, int64_t threads, int64_t lanes, bool backward)
      : x1(x1_), x2(x2_), x3(x3_), position(position_), relation(relation_), B(x1_.batch), R(x1_.channels),
        C(x3_.channels), H(x1_.height), W(x1_.width), ks(ks_), KK(ks_ * ks_), pad(ks_ / 2), Hp(H + 2 * pad),
        Wp(W + 2 * pad), rel_channels(pair_relation_channels(relation_, x1_.channels)),
        in_channels(rel_channels + (position_ ? 2 : 0)),
        plan(x1_.batch, H, W, ks_, lanes, Vec<T>::lanes, threads, backward), Cw(weight_channels),
        agg(x3_.channels, weight_channels, ks_, x1_.height + 2 * (ks_ / 2), x1_.width + 2 * (ks_ / 2)) {
    x1p = Buffer<T>(B * R * Hp * Wp);
    x2p = Buffer<T>(B * R * Hp * Wp);
    x3p = Buffer<T>(B * C * Hp * Wp);
    pad_planes(x1, pad, x1p.ptr());
    pad_planes(x2, pad, x2p.ptr());
    pad_planes(x3, pad, x3p.ptr());
    if (position) {
      posp = Buffer<T>(2 * Hp * Wp);
      pad_planes(MapView<T>{position, 1, 0, 2, H, W}, pad, posp.ptr());
    }
  }

  // backward: the raw inputs of layers store_from.. of every offset of a tile kept between its two sweeps
  bool store_hidden = false;
  int64_t store_from = 1;
  int64_t lanes_max() const { return plan.lane_stride; }
  int64_t ext_max() const { return plan.extended_stride; }
  double count() const { return double(B) * H * W * KK; }

  // relation of offset j on a tile, (in_channels x lanes) with row stride ld; relu(scale * v + shift) if scale.
  // Each row of the tile is whole vectors read from the padded maps (a vector may run past the row: the next row,
  // written after it, overwrites what it spilled); the lanes past the tile's are zeroed.
  void pack(const Tile& t, int64_t j, T* out, int64_t ld, const T* scale, const T* shift) const {
    SAN_PHASE(kPack);
    const int64_t dh = j / ks, dw = j % ks;
    const int64_t centre_offset = (t.h0 + pad) * Wp + t.w0 + pad, neighbour_offset = (t.h0 + dh) * Wp + t.w0 + dw;
    const T* c1 = x1p.ptr() + t.b * R * Hp * Wp + centre_offset;
    const T* n2 = x2p.ptr() + t.b * R * Hp * Wp + neighbour_offset;
    const int64_t plane = Hp * Wp;
    if (relation == kDot) {
      pack_dot(t, out, c1, n2, plane, scale, shift);
    } else {
      for (int64_t k = 0; k < rel_channels; ++k) {
        const int64_t c = relation == kConcatenation ? k % R : k;
        const T* a = c1 + c * plane;
        const T* b = n2 + c * plane;
        T* row = out + k * ld;
        switch (relation) {
          case kSubtraction: pack_rows(t, row, a, b, scale, shift, k, [](auto x, auto y) { return x - y; }); break;
          case kSummation: pack_rows(t, row, a, b, scale, shift, k, [](auto x, auto y) { return x + y; }); break;
          case kHadamard: pack_rows(t, row, a, b, scale, shift, k, [](auto x, auto y) { return x * y; }); break;
          default:
            if (k < R) pack_rows(t, row, a, b, scale, shift, k, [](auto x, auto) { return x; });
            else pack_rows(t, row, a, b, scale, shift, k, [](auto, auto y) { return y; });
        }
      }
    }
    if (position)
      for (int64_t k = 0; k < 2; ++k)
        pack_rows(t, out + (rel_channels + k) * ld, posp.ptr() + k * plane + centre_offset,
                  posp.ptr() + k * plane + neighbour_offset, scale, shift, rel_channels + k,
                  [](auto x, auto y) { return x - y; });
  }

  template <class Op>
  void pack_rows(const Tile& t, T* row, const T* a, const T* b, const T* scale, const T* shift, int64_t k,
                 Op op) const {
    constexpr int L = Vec<T>::lanes;
    const int64_t lanes = t.lanes(), n = padded_lanes<T>(lanes);
    if (scale) {
      const T s = scale[k], sh = shift[k];
      for (int64_t rr = 0; rr < t.rows; ++rr)
        for (int64_t q = 0; q < t.len; q += L)
          store<T>(row + rr * t.len + q,
                   relu<T>(op(load<T>(a + rr * Wp + q), load<T>(b + rr * Wp + q)) * s + sh));
    } else {
      for (int64_t rr = 0; rr < t.rows; ++rr)
        for (int64_t q = 0; q < t.len; q += L)
          store<T>(row + rr * t.len + q, op(load<T>(a + rr * Wp + q), load<T>(b + rr * Wp + q)));
    }
    for (int64_t q = lanes; q < n; ++q) row[q] = T(0);
  }

  void pack_dot(const Tile& t, T* row, const T* c1, const T* n2, int64_t plane, const T* scale,
                const T* shift) const {
    constexpr int L = Vec<T>::lanes;
    const int64_t lanes = t.lanes(), n = padded_lanes<T>(lanes);
    for (int64_t rr = 0; rr < t.rows; ++rr)
      for (int64_t q = 0; q < t.len; q += L) {
        vec_t<T> acc = splat<T>(T(0));
        for (int64_t c = 0; c < R; ++c)
          acc += load<T>(c1 + c * plane + rr * Wp + q) * load<T>(n2 + c * plane + rr * Wp + q);
        if (scale) acc = relu<T>(acc * scale[0] + shift[0]);
        store<T>(row + rr * t.len + q, acc);
      }
    for (int64_t q = lanes; q < n; ++q) row[q] = T(0);
  }

  // gradient g of the relation of offset j (in_channels x lanes, stride ld) added to x1's (a tile buffer, R x
  // lanes, stride ld), x2's (a band canvas, R x canvas rows x Wp) and the position's (a padded 2 x Hp x Wp canvas)
  void relation_backward(const Tile& t, int64_t j, const T* g, int64_t ld, T* gx1, T* canvas2, int64_t band_h0,
                         int64_t canvas_rows, T* gpos) const {
    SAN_PHASE(kScatter);
    const int64_t dh = j / ks, dw = j % ks, plane = Hp * Wp;
    const int64_t centre_offset = (t.h0 + pad) * Wp + t.w0 + pad, neighbour_offset = (t.h0 + dh) * Wp + t.w0 + dw;
    const T* x1c = x1p.ptr() + t.b * R * plane + centre_offset;
    const T* x2n = x2p.ptr() + t.b * R * plane + neighbour_offset;
    T* c2 = canvas2 + (t.h0 - band_h0 + dh) * Wp + t.w0 + dw;
    for (int64_t c = 0; c < R; ++c) {
      T* g1 = gx1 + c * ld;
      T* g2 = c2 + c * canvas_rows * Wp;
      const T* gr = g + (relation == kDot ? 0 : c) * ld;
      switch (relation) {
        case kSubtraction:
          add_tile_rows<T>(t, gr, g1, t.len, T(1));
          add_tile_rows<T>(t, gr, g2, Wp, T(-1));
          break;
        case kSummation:
          add_tile_rows<T>(t, gr, g1, t.len, T(1));
          add_tile_rows<T>(t, gr, g2, Wp, T(1));
          break;
        case kConcatenation:
          add_tile_rows<T>(t, gr, g1, t.len, T(1));
          add_tile_rows<T>(t, g + (R + c) * ld, g2, Wp, T(1));
          break;
        default:  // hadamard, and dot (one relation channel): products of the two maps
          add_tile_rows<T>(t, gr, g1, t.len, T(1), x2n + c * plane, Wp);
          add_tile_rows<T>(t, gr, g2, Wp, T(1), x1c + c * plane, Wp);
          break;
      }
    }
    if (position && gpos)
      for (int64_t k = 0; k < 2; ++k) {
        const T* gr = g + (rel_channels + k) * ld;
        add_tile_rows<T>(t, gr, gpos + k * plane + centre_offset, Wp, T(1));
        add_tile_rows<T>(t, gr, gpos + k * plane + neighbour_offset, Wp, T(-1));
      }
  }
};

// Buffers one thread uses for the tiles of its bands
template <class T>
struct PairScratch {
  int64_t P, E;  // lanes of a tile row buffer, of an extended row buffer
  std::vector<Buffer<T>> act, raw;  // act[l]: input of layer l (in[l] rows); raw[l]: its pre-norm values
  Buffer<T> logits, grads, w_ext, g_ext, x_ext, out_scratch;
  Buffer<T> store;         // store_hidden: raw[l] of every offset j at (j * store_rows + row of l) * P
  std::vector<int64_t> store_row;  // first row of layer l's raw values in an offset's block
  int64_t store_rows = 0;

  PairScratch(const Pairwise<T>& p, bool backward) : P(p.lanes_max()), E(p.ext_max()) {
    const Mapping<T>& m = p.map;
    const int64_t stride = padded_rows(p.Cw);
    for (int64_t l = 0; l < m.layers; ++l) {
      act.emplace_back(padded_rows(m.in[l]) * P);
      if (backward) raw.emplace_back(padded_rows(m.in[l]) * P);
    }
    logits = Buffer<T>((p.KK * stride + 1) * P);  // and a spare row for the softmax's sums
    w_ext = Buffer<T>(p.KK * p.Cw * E);
    out_scratch = Buffer<T>(8 * E);
    if (backward) {
      grads = Buffer<T>(p.KK * stride * P);
      g_ext = Buffer<T>(p.C * E);
      x_ext = Buffer<T>(p.KK * p.Cw * E);
    }
    store_row.assign(m.layers, 0);
    for (int64_t l = p.store_from; l < m.layers; ++l) {
      store_row[l] = store_rows;
      store_rows += padded_rows(m.in[l]);
    }
    if (backward && p.store_hidden) store = Buffer<T>(p.KK * store_rows * P);
  }

  T* stored(int64_t j, int64_t l) { return store.ptr() + (j * store_rows + store_row[l]) * P; }
};

// lanes of a backward tile whose layer inputs from layer `from` on, every offset's, fit `budget` bytes between the
// pass's two sweeps: at least two vectors, at most the widest tile, or 0 where they do not fit
template <class T>
int64_t stored_lanes(const std::vector<int64_t>& ins, int64_t from, int64_t offsets, int64_t budget) {
  int64_t rows = 0;
  for (size_t l = from; l < ins.size(); ++l) rows += padded_rows(ins[l]);
  if (rows == 0) return 0;
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t lanes = std::min<int64_t>(kBlock * L, budget / (int64_t(sizeof(T)) * offsets * rows) / L * L);
  return lanes >= 2 * L ? lanes : 0;
}

// the mapping of offset j on a tile: act[0] the normalised relation, logits rows j * stride (eval / forward)
template <class T>
void pair_logits(const Pairwise<T>& p, const Tile& t, int64_t j, PairScratch<T>& s, T* logits) {
  const Mapping<T>& m = p.map;
  const int64_t n = padded_lanes<T>(t.lanes()), P = s.P;
  p.pack(t, j, s.act[0].ptr(), P, m.scale[0].data(), m.shift[0].data());
  for (int64_t l = 0; l + 1 < m.layers; ++l)
    gemm<T>(m.weight[l], s.act[l].ptr(), P, s.act[l + 1].ptr(), P, n, hidden_epilogue(m, l));
  gemm<T>(m.weight[m.layers - 1], s.act[m.layers - 1].ptr(), P, logits, P, n, bias_epilogue(m, m.layers - 1));
}

// pair_logits, keeping the hidden layers' raw values in s.stored(j, l)
template <class T>
void pair_logits_stored(const Pairwise<T>& p, const Tile& t, int64_t j, PairScratch<T>& s, T* logits) {
  const Mapping<T>& m = p.map;
  const int64_t n = padded_lanes<T>(t.lanes()), P = s.P;
  if (p.store_from == 0) {
    p.pack(t, j, s.stored(j, 0), P, nullptr, nullptr);
    normalize_relu(s.stored(j, 0), s.act[0].ptr(), m.in[0], n, P, m.scale[0].data(), m.shift[0].data());
  } else {
    p.pack(t, j, s.act[0].ptr(), P, m.scale[0].data(), m.shift[0].data());
  }
  for (int64_t l = 0; l + 1 < m.layers; ++l) {
    T* raw = s.stored(j, l + 1);
    gemm<T>(m.weight[l], s.act[l].ptr(), P, raw, P, n, bias_epilogue(m, l));
    normalize_relu(raw, s.act[l + 1].ptr(), m.in[l + 1], n, P, m.scale[l + 1].data(), m.shift[l + 1].data());
  }
  gemm<T>(m.weight[m.layers - 1], s.act[m.layers - 1].ptr(), P, logits, P, n, bias_epilogue(m, m.layers - 1));
}

// the softmax weights of every offset of a tile: on the extended grid in s.w_ext (rows j * Cw + cw), and, for
// backward (compact = true), also in s.logits (rows j * stride + cw)
template <class T>
void pair_weights(const Pairwise<T>& p, const Tile& t, PairScratch<T>& s, bool compact) {
  const int64_t stride = padded_rows(p.Cw), n = padded_lanes<T>(t.lanes());
  for (int64_t j = 0; j < p.KK; ++j) {
    if (compact && p.store_hidden) pair_logits_stored(p, t, j, s, s.logits.ptr() + j * stride * s.P);
    else pair_logits(p, t, j, s, s.logits.ptr() + j * stride * s.P);
  }
  if (!compact && t.rows == 1) {  // one tile row: the compact lanes are the extended grid
    softmax_offsets(s.logits.ptr(), p.KK, p.Cw, stride, s.P, n);
    return;
  }
  if (!compact) {
    softmax_offsets(s.logits.ptr(), p.KK, p.Cw, stride, s.P, n, s.w_ext.ptr(), s.E, &t, p.Wp);
    return;
  }
  softmax_offsets(s.logits.ptr(), p.KK, p.Cw, stride, s.P, n);
  for (int64_t j = 0; j < p.KK; ++j)
    to_extended(s.logits.ptr() + j * stride * s.P, s.P, s.w_ext.ptr() + j * p.Cw * s.E, s.E, p.Cw, t, p.Wp);
}

// where pair_weights (compact = false) left the weights: the logits' rows for a one-row tile, else the grid's
template <class T>
WeightRows<T> pair_weight_rows(const Pairwise<T>& p, const Tile& t, PairScratch<T>& s) {
  if (t.rows == 1) return WeightRows<T>{s.logits.ptr(), s.P, padded_rows(p.Cw), 1};
  return WeightRows<T>{s.w_ext.ptr(), s.E, p.Cw, 1};
}

// eval, and the training forward once every norm is known: out (B, C, H, W)
template <class T>
void pairwise_forward(const Pairwise<T>& p, T* out) {
  torch::stable::parallel_for(0, p.plan.bands.size(), 1, [&](int64_t begin, int64_t end) {
    PairScratch<T> s(p, false);
    for (int64_t bi = begin; bi < end; ++bi)
      for (int64_t ti = p.plan.bands[bi].first_tile; ti < p.plan.bands[bi].end_tile; ++ti) {
        const Tile& t = p.plan.tiles[ti];
        pair_weights(p, t, s, false);
        aggregate_tile(p.agg, t, p.x3p.ptr(), pair_weight_rows(p, t, s), out, p.H, p.W, s.out_scratch.ptr());
      }
  });
}

// training: the batch sums (sum, sum of squares) of the input of layer l, every norm below it known
template <class T>
std::vector<double> pairwise_norm_sums(const Pairwise<T>& p, int64_t l) {
  const Mapping<T>& m = p.map;
  const int64_t channels = m.in[l];
  Reduction red(2 * channels);
  torch::stable::parallel_for(0, p.plan.bands.size(), 1, [&](int64_t begin, int64_t end) {
    PairScratch<T> s(p, false);
    double* acc = red.slot(begin);
    Buffer<T> raw(padded_rows(channels) * s.P);
    for (int64_t bi = begin; bi < end; ++bi)
      for (int64_t ti = p.plan.bands[bi].first_tile; ti < p.plan.bands[bi].end_tile; ++ti) {
        const Tile& t = p.plan.tiles[ti];
        const int64_t n = padded_lanes<T>(t.lanes());
        for (int64_t j = 0; j < p.KK; ++j) {
          if (l == 0) {
            p.pack(t, j, raw.ptr(), s.P, nullptr, nullptr);
          } else {
            p.pack(t, j, s.act[0].ptr(), s.P, m.scale[0].data(), m.shift[0].data());
            for (int64_t k = 0; k + 1 < l; ++k)
              gemm<T>(m.weight[k], s.act[k].ptr(), s.P, s.act[k + 1].ptr(), s.P, n, hidden_epilogue(m, k));
            gemm<T>(m.weight[l - 1], s.act[l - 1].ptr(), s.P, raw.ptr(), s.P, n, bias_epilogue(m, l - 1));
          }
          add_moments(raw.ptr(), channels, t.lanes(), s.P, acc, channels);
        }
      }
  });
  return red.total();
}

// Gradients of one pairwise call; maps zero-initialised by the caller
template <class T>
struct PairGrads {
  T* x1;                 // (B, R, H, W)
  T* x2;                 // padded (B, R, Hp, Wp): written whole by the scatters
  T* x3;                 // padded (B, C, Hp, Wp)
  std::vector<double> position;  // padded (2, Hp, Wp)
  std::vector<std::vector<double>> weight, bias, norm;  // per layer; norm: [sum gz, sum gz * hhat] of norm l
};

// Backward pass for the norm before layer `lowest`: recompute, carry the gradient down from the logits to that
// norm's input activations, sum its reductions; on the way, the weight gradients of layer `lowest` and, in the
// first pass, the aggregation's gradients; in the last (lowest == 0), the relation's gradient less the norm's
// correction, scattered onto the maps.
template <class T>
void pairwise_backward_pass(const Pairwise<T>& p, const MapView<T>& grad_out, int64_t lowest, PairGrads<T>& g) {
  const Mapping<T>& m = p.map;
  const int64_t L = m.layers, stride = padded_rows(p.Cw);
  const bool first = lowest == L - 1, last = lowest == 0;
  const int64_t in_l = m.in[lowest], out_l = m.out[lowest];
  Reduction red(2 * in_l + out_l * in_l + out_l);
  Reduction pos_red(last && p.position ? 2 * p.Hp * p.Wp : 0);
  BandScatter<T> scatter3(p.plan, p.C, g.x3, false);
  BandScatter<T> scatter2(p.plan, p.R, g.x2, false);
  torch::stable::parallel_for(0, p.plan.bands.size(), 1, [&](int64_t begin, int64_t end) {
    PairScratch<T> s(p, true);
    double* acc = red.slot(begin);
    double* norm_acc = acc;
    double* w_acc = acc + 2 * in_l;
    double* b_acc = w_acc + out_l * in_l;
    OuterProduct<T> outer(out_l, in_l, s.P);
    Buffer<T> grad_h(padded_rows(std::max<int64_t>(1, *std::max_element(m.out.begin(), m.out.end()))) * s.P);
    Buffer<T> grad_a(padded_rows(*std::max_element(m.in.begin(), m.in.end())) * s.P);
    Buffer<T> pos_buffer, canvas3_buffer, canvas2_buffer, gx1_tile;
    T* pos_canvas = last && p.position ? zeroed(pos_buffer, 2 * p.Hp * p.Wp) : nullptr;
    T* canvas3 = nullptr;
    T* canvas2 = nullptr;
    for (int64_t bi = begin; bi < end; ++bi) {
      const Band& band = p.plan.bands[bi];
      const int64_t canvas_rows = band.h1 - band.h0 + 2 * p.pad;
      if (first) canvas3 = zeroed(canvas3_buffer, scatter3.canvas_size(band));
      if (last) canvas2 = zeroed(canvas2_buffer, scatter2.canvas_size(band));
      for (int64_t ti = band.first_tile; ti < band.end_tile; ++ti) {
        const Tile& t = p.plan.tiles[ti];
        const int64_t lanes = t.lanes(), n = padded_lanes<T>(lanes), P = s.P;
        if (last) zeroed(gx1_tile, p.R * P);
        // weights, their gradient from the aggregation, the softmax's backward: gradient of the logits
        pair_weights(p, t, s, true);
        map_to_extended(grad_out, t, p.Wp, s.g_ext.ptr(), s.E);
        aggregate_weight_grad(p.agg, t, p.x3p.ptr(), s.g_ext.ptr(), s.E, s.x_ext.ptr());
        if (first)
          aggregate_input_grad(p.agg, t, band.h0, s.w_ext.ptr(), s.g_ext.ptr(), s.E, canvas3, canvas_rows);
        for (int64_t j = 0; j < p.KK; ++j)
          from_extended(s.x_ext.ptr() + j * p.Cw * s.E, s.E, s.grads.ptr() + j * stride * P, P, p.Cw, t, p.Wp);
        softmax_offsets_backward(s.logits.ptr(), s.grads.ptr(), p.KK, p.Cw, stride, P, n);
        for (int64_t j = 0; j < p.KK; ++j) {
          // the activations of offset j (the hidden ones kept from the first sweep, or recomputed), then down
          std::vector<T*> raws(L);
          const bool stored_relation = p.store_hidden && p.store_from == 0;
          raws[0] = stored_relation ? s.stored(j, 0) : s.raw[0].ptr();
          if (!stored_relation) p.pack(t, j, raws[0], P, nullptr, nullptr);
          normalize_relu(raws[0], s.act[0].ptr(), m.in[0], n, P, m.scale[0].data(), m.shift[0].data());
          for (int64_t l = 0; l + 1 < L; ++l) {
            raws[l + 1] = p.store_hidden ? s.stored(j, l + 1) : s.raw[l + 1].ptr();
            if (!p.store_hidden)
              gemm<T>(m.weight[l], s.act[l].ptr(), P, raws[l + 1], P, n, bias_epilogue(m, l));
            normalize_relu(raws[l + 1], s.act[l + 1].ptr(), m.in[l + 1], n, P, m.scale[l + 1].data(),
                           m.shift[l + 1].data());
          }
          const T* grad_top = s.grads.ptr() + j * stride * P;  // gradient of h[L - 1]
          std::memcpy(grad_h.ptr(), grad_top, stride * P * sizeof(T));
          for (int64_t l = L - 1; l >= lowest; --l) {
            if (l == lowest) {
              outer.set_left(grad_h.ptr(), P, lanes);
              outer.add(s.act[l].ptr(), P, lanes);
              add_row_sums(grad_h.ptr(), m.out[l], lanes, P, b_acc);
            }
            gemm<T>(m.weight_t[l], grad_h.ptr(), P, grad_a.ptr(), P, n, Epilogue<T>());
            const T* raw = raws[l];
            if (l == lowest) {
              // in the last pass scale * gz: the norm's gradient but for its correction (the closing pass)
              relu_norm_sums(grad_a.ptr(), s.act[l].ptr(), raw, m.in[l], lanes, n, P, m, l, norm_acc, nullptr, last);
              if (last) {
                p.relation_backward(t, j, grad_a.ptr(), P, gx1_tile.ptr(), canvas2, band.h0, canvas_rows, pos_canvas);
              }
            } else {
              relu_mask(grad_a.ptr(), s.act[l].ptr(), m.in[l], n, P);
              norm_input_grad(grad_a.ptr(), raw, grad_h.ptr(), m.in[l], lanes, n, P, m, l, g.norm[l], p.count());
            }
          }
        }
        outer.flush(w_acc);
        if (last) add_tile_to_map(gx1_tile.ptr(), P, p.R, t, p.H, p.W, g.x1);
      }
      if (first) scatter3.flush(bi, canvas3);
      if (last) scatter2.flush(bi, canvas2);
    }
    if (pos_canvas) {
      double* pacc = pos_red.slot(begin);
      for (int64_t i = 0; i < 2 * p.Hp * p.Wp; ++i) pacc[i] += pos_canvas[i];
    }
  });
  if (first) scatter3.merge();
  if (last) scatter2.merge();
  const std::vector<double> sums = red.total();
  g.norm[lowest].assign(sums.begin(), sums.begin() + 2 * in_l);
  g.weight[lowest].assign(sums.begin() + 2 * in_l, sums.begin() + 2 * in_l + out_l * in_l);
  g.bias[lowest].assign(sums.begin() + 2 * in_l + out_l * in_l, sums.end());
  if (last && p.position) g.position = pos_red.total();
}

// the closing pass: the first norm's input gradient that its reductions decide, alpha + beta * relation,
// added through the relation's backward
template <class T>
void pairwise_correction_pass(const Pairwise<T>& p, PairGrads<T>& g) {
  const Mapping<T>& m = p.map;
  std::vector<T> alpha, beta;
  norm_correction(m, 0, g.norm[0], p.count(), alpha, beta);
  Reduction pos_red(p.position ? 2 * p.Hp * p.Wp : 0);
  BandScatter<T> scatter2(p.plan, p.R, g.x2, true);
  torch::stable::parallel_for(0, p.plan.bands.size(), 1, [&](int64_t begin, int64_t end) {
    const int64_t P = p.lanes_max();
    Buffer<T> rel(padded_rows(m.in[0]) * P), gx1_tile;
    Buffer<T> pos_buffer, canvas_buffer;
    T* pos_canvas = p.position ? zeroed(pos_buffer, 2 * p.Hp * p.Wp) : nullptr;
    for (int64_t bi = begin; bi < end; ++bi) {
      const Band& band = p.plan.bands[bi];
      const int64_t canvas_rows = band.h1 - band.h0 + 2 * p.pad;
      T* canvas = zeroed(canvas_buffer, scatter2.canvas_size(band));
      for (int64_t ti = band.first_tile; ti < band.end_tile; ++ti) {
        const Tile& t = p.plan.tiles[ti];
        const int64_t lanes = t.lanes();
        zeroed(gx1_tile, p.R * P);
        for (int64_t j = 0; j < p.KK; ++j) {
          p.pack(t, j, rel.ptr(), P, nullptr, nullptr);
          for (int64_t r = 0; r < m.in[0]; ++r)
            for (int64_t q = 0; q < lanes; ++q) rel.ptr()[r * P + q] = alpha[r] + beta[r] * rel.ptr()[r * P + q];
          p.relation_backward(t, j, rel.ptr(), P, gx1_tile.ptr(), canvas, band.h0, canvas_rows, pos_canvas);
        }
        add_tile_to_map(gx1_tile.ptr(), P, p.R, t, p.H, p.W, g.x1);
      }
      scatter2.flush(bi, canvas);
    }
    if (pos_canvas) {
      double* pacc = pos_red.slot(begin);
      for (int64_t i = 0; i < 2 * p.Hp * p.Wp; ++i) pacc[i] += pos_canvas[i];
    }
  });
  scatter2.merge();
  if (p.position) {
    const std::vector<double> pos = pos_red.total();
    for (size_t i = 0; i < pos.size(); ++i) g.position[i] += pos[i];
  }
}

}  // namespace san
