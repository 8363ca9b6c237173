// Patchwise SAM on CPU: for every pixel, the relation of x1 at the pixel with x2 over its whole footprint, a weight
// mapping whose first layer sums over the footprint (so every later layer is per pixel), and the aggregation of
// x3 with the k * k * Cw weights it gives (no softmax). One parallel loop per pass over bands of rows.
//
// The first layer is computed chunk by chunk (the centre's channels, then each offset's), accumulating on the
// tile: the footprint-sized relation is never held whole. Training keeps the per-pixel hidden layers (map-sized)
// between the passes and, going down in backward, the gradient at each per-pixel norm.
#pragma once

#include <vector>

#include "aggregate.h"
#include "mapping.h"

namespace san {

enum PatchRelation : int64_t { kPatchConcatenation = 0 };

template <class T>
struct Patchwise {
  MapView<T> x1, x2, x3;
  int64_t relation;
  int64_t B, R, C, H, W, ks, KK, pad, Hp, Wp, Cw;
  Plan plan;
  Buffer<T> x1p, x2p, x3p;  // padded copies
  Mapping<T> map;                 // layer 0 the footprint's, the rest per pixel
  std::vector<Packed<T>> chunk_w, chunk_wt;  // layer 0's columns of each chunk: the centre's, then offset j's
  AggregationShape agg;

  Patchwise(MapView<T> x1_, MapView<T> x2_, MapView<T> x3_, int64_t relation_, int64_t ks_, int64_t weight_channels,
            int64_t threads, bool backward)
      : x1(x1_), x2(x2_), x3(x3_), relation(relation_), B(x1_.batch), R(x1_.channels), C(x3_.channels),
        H(x1_.height), W(x1_.width), ks(ks_), KK(ks_ * ks_), pad(ks_ / 2), Hp(H + 2 * pad), Wp(W + 2 * pad),
        Cw(weight_channels), plan(x1_.batch, H, W, ks_, kBlock * Vec<T>::lanes, Vec<T>::lanes, threads, backward),
        agg(x3_.channels, weight_channels, ks_, x1_.height + 2 * (ks_ / 2), x1_.width + 2 * (ks_ / 2)) {
    x1p = Buffer<T>(B * R * Hp * Wp);
    x2p = Buffer<T>(B * R * Hp * Wp);
    x3p = Buffer<T>(B * C * Hp * Wp);
    pad_planes(x1, pad, x1p.ptr());
    pad_planes(x2, pad, x2p.ptr());
    pad_planes(x3, pad, x3p.ptr());
    for (int64_t chunk = 0; chunk <= KK; ++chunk) {
      chunk_channels.emplace_back(R);
      for (int64_t c = 0; c < R; ++c) chunk_channels[chunk][c] = channel(chunk, c);
    }
  }

  int64_t relation_channels() const { return R * (KK + 1); }
  int64_t chunks() const { return KK + 1; }
  double count() const { return double(B) * H * W; }
  // relation channel of row c of chunk: the centre's c, or footprint channel c * k * k + j (unfold's order)
  int64_t channel(int64_t chunk, int64_t c) const { return chunk == 0 ? c : R + c * KK + (chunk - 1); }
  std::vector<std::vector<int64_t>> chunk_channels;  // channel(chunk, c) for every c

  // after set_layers: layer 0's weight (Cw x R(k*k+1), row-major) split by chunk
  void pack_chunks(const T* w0) {
    const int64_t K0 = relation_channels(), out0 = map.out[0];
    chunk_w.emplace_back(w0, out0, R, K0, 1);
    chunk_wt.emplace_back(w0, R, out0, 1, K0);
    for (int64_t j = 0; j < KK; ++j) {
      chunk_w.emplace_back(w0 + R + j, out0, R, K0, KK);
      chunk_wt.emplace_back(w0 + R + j, R, out0, KK, K0);
    }
  }

  // chunk of the relation on a tile (R x lanes, stride ld): raw, or relu(scale * v + shift) with norm 0's affine.
  // Whole vectors per row of the tile, read from the padded maps (see Pairwise::pack).
  void pack(const Tile& t, int64_t chunk, T* out, int64_t ld, bool normalize) const {
    SAN_PHASE(kPack);
    constexpr int L = Vec<T>::lanes;
    const int64_t lanes = t.lanes(), n = padded_lanes<T>(lanes);
    const int64_t dh = chunk == 0 ? pad : (chunk - 1) / ks, dw = chunk == 0 ? pad : (chunk - 1) % ks;
    const T* src0 = (chunk == 0 ? x1p.ptr() : x2p.ptr()) + t.b * R * Hp * Wp + (t.h0 + dh) * Wp + t.w0 + dw;
    for (int64_t c = 0; c < R; ++c) {
      T* row = out + c * ld;
      const T* src = src0 + c * Hp * Wp;
      const int64_t k = channel(chunk, c);
      const T s = normalize ? map.scale[0][k] : T(1), sh = normalize ? map.shift[0][k] : T(0);
      for (int64_t rr = 0; rr < t.rows; ++rr)
        for (int64_t q = 0; q < t.len; q += L) {
          const vec_t<T> v = load<T>(src + rr * Wp + q);
          store<T>(row + rr * t.len + q, normalize ? relu<T>(v * s + sh) : v);
        }
      for (int64_t q = lanes; q < n; ++q) row[q] = T(0);
    }
  }

  // gradient of a chunk (R x lanes, stride ld) added to x1's (a tile buffer, R x lanes, stride ld) or x2's (a band
  // canvas)
  void chunk_backward(const Tile& t, int64_t chunk, const T* g, int64_t ld, T* gx1, T* canvas2, int64_t band_h0,
                      int64_t canvas_rows) const {
    SAN_PHASE(kScatter);
    const int64_t dh = (chunk - 1) / ks, dw = (chunk - 1) % ks;
    for (int64_t c = 0; c < R; ++c) {
      if (chunk == 0) {
        add_tile_rows<T>(t, g + c * ld, gx1 + c * ld, t.len, T(1));
      } else {
        T* dst = canvas2 + (c * canvas_rows + t.h0 - band_h0 + dh) * Wp + t.w0 + dw;
        add_tile_rows<T>(t, g + c * ld, dst, Wp, T(1));
      }
    }
  }
};

template <class T>
struct PatchScratch {
  int64_t P, E;
  Buffer<T> chunk, hidden, act, logits, w_ext, g_ext, x_ext, grads, grad_a, out_scratch;

  PatchScratch(const Patchwise<T>& p, bool backward) : P(p.plan.lane_stride), E(p.plan.extended_stride) {
    const Mapping<T>& m = p.map;
    // rows of the per-pixel layers' inputs and hidden outputs (layer 0's input, the relation, comes in chunks)
    int64_t widest = p.R;
    for (int64_t l = 1; l < m.layers; ++l) widest = std::max({widest, m.in[l], m.out[l - 1]});
    widest = padded_rows(widest);
    chunk = Buffer<T>(padded_rows(p.R) * P);
    hidden = Buffer<T>(widest * P);
    act = Buffer<T>(widest * P);
    logits = Buffer<T>(padded_rows(m.out[m.layers - 1]) * P);
    w_ext = Buffer<T>(p.KK * p.Cw * E);
    out_scratch = Buffer<T>(8 * E);
    if (backward) {
      g_ext = Buffer<T>(p.C * E);
      x_ext = Buffer<T>(p.KK * p.Cw * E);
      grads = Buffer<T>(padded_rows(m.out[m.layers - 1]) * P);
      grad_a = Buffer<T>(widest * P);
    }
  }
};

// (rows x lanes) of a map (B, rows, H, W) on a tile, compact, padding lanes zeroed; and back
template <class T>
void read_tile(const T* map, int64_t rows, const Tile& t, int64_t H, int64_t W, T* out, int64_t ld) {
  const int64_t lanes = t.lanes(), n = padded_lanes<T>(lanes);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t rr = 0; rr < t.rows; ++rr)
      std::memcpy(out + r * ld + rr * t.len, map + ((t.b * rows + r) * H + t.h0 + rr) * W + t.w0, t.len * sizeof(T));
    std::fill(out + r * ld + lanes, out + r * ld + n, T(0));
  }
}

template <class T>
void write_tile(const T* in, int64_t ld, int64_t rows, const Tile& t, int64_t H, int64_t W, T* map) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t rr = 0; rr < t.rows; ++rr)
      std::memcpy(map + ((t.b * rows + r) * H + t.h0 + rr) * W + t.w0, in + r * ld + rr * t.len, t.len * sizeof(T));
}

// layer 0 over the footprint, chunk by chunk: out = W0 a0 + bias (ep may add the next norm's relu affine)
template <class T>
void patch_first_layer(const Patchwise<T>& p, const Tile& t, PatchScratch<T>& s, T* out, Epilogue<T> last_ep) {
  const int64_t n = padded_lanes<T>(t.lanes());
  for (int64_t chunk = 0; chunk < p.chunks(); ++chunk) {
    p.pack(t, chunk, s.chunk.ptr(), s.P, true);
    Epilogue<T> ep;
    if (chunk == 0) ep.bias = p.map.bias[0].data();
    else ep.accumulate = true;
    if (chunk + 1 == p.chunks()) {
      ep.scale = last_ep.scale;
      ep.shift = last_ep.shift;
    }
    gemm<T>(p.chunk_w[chunk], s.chunk.ptr(), s.P, out, s.P, n, ep);
  }
}

// the weights of a tile on the extended grid (rows j * Cw + cw) from the mapping's output (rows cw * k * k + j)
template <class T>
void patch_weights_extended(const Patchwise<T>& p, const Tile& t, const T* logits, PatchScratch<T>& s) {
  for (int64_t j = 0; j < p.KK; ++j)
    for (int64_t cw = 0; cw < p.Cw; ++cw)
      to_extended(logits + (cw * p.KK + j) * s.P, s.P, s.w_ext.ptr() + (j * p.Cw + cw) * s.E, s.E, 1, t, p.Wp);
}

// the per-pixel layers from act (input of layer `from`) up to the logits
template <class T>
void patch_upper_layers(const Patchwise<T>& p, const Tile& t, PatchScratch<T>& s, int64_t from) {
  const Mapping<T>& m = p.map;
  const int64_t n = padded_lanes<T>(t.lanes()), L = m.layers;
  for (int64_t l = from; l + 1 < L; ++l) {
    gemm<T>(m.weight[l], s.act.ptr(), s.P, s.hidden.ptr(), s.P, n, hidden_epilogue(m, l));
    std::swap(s.act, s.hidden);
  }
  gemm<T>(m.weight[L - 1], s.act.ptr(), s.P, s.logits.ptr(), s.P, n, bias_epilogue(m, L - 1));
}

// eval, and the training forward (hidden: the saved input of the top layer's norm, or null to compute it)
template <class T>
void patchwise_forward(const Patchwise<T>& p, T* out, const T* top_hidden) {
  const Mapping<T>& m = p.map;
  const int64_t L = m.layers;
  torch::stable::parallel_for(0, p.plan.bands.size(), 1, [&](int64_t begin, int64_t end) {
    PatchScratch<T> s(p, false);
    for (int64_t bi = begin; bi < end; ++bi)
      for (int64_t ti = p.plan.bands[bi].first_tile; ti < p.plan.bands[bi].end_tile; ++ti) {
        const Tile& t = p.plan.tiles[ti];
        const int64_t n = padded_lanes<T>(t.lanes());
        if (L == 1) {
          patch_first_layer(p, t, s, s.logits.ptr(), Epilogue<T>());
        } else if (top_hidden) {
          read_tile(top_hidden, m.in[L - 1], t, p.H, p.W, s.hidden.ptr(), s.P);
          normalize_relu(s.hidden.ptr(), s.act.ptr(), m.in[L - 1], n, s.P, m.scale[L - 1].data(),
                         m.shift[L - 1].data());
          patch_upper_layers(p, t, s, L - 1);
        } else {
          Epilogue<T> ep;
          ep.scale = m.scale[1].data();
          ep.shift = m.shift[1].data();
          patch_first_layer(p, t, s, s.act.ptr(), ep);
          patch_upper_layers(p, t, s, 1);
        }
        // one tile row: the compact lanes are the extended grid, the mapping's output rows (cw * k * k + j) the weights
        WeightRows<T> rows{s.logits.ptr(), s.P, 1, p.KK};
        if (t.rows > 1) {
          patch_weights_extended(p, t, s.logits.ptr(), s);
          rows = WeightRows<T>{s.w_ext.ptr(), s.E, p.Cw, 1};
        }
        aggregate_tile(p.agg, t, p.x3p.ptr(), rows, out, p.H, p.W, s.out_scratch.ptr());
      }
  });
}

// training: sums (sum, sum of squares) of norm 0's input, the relation, per channel
template <class T>
std::vector<double> patchwise_relation_sums(const Patchwise<T>& p) {
  const int64_t K0 = p.relation_channels();
  Reduction red(2 * K0);
  torch::stable::parallel_for(0, p.plan.bands.size(), 1, [&](int64_t begin, int64_t end) {
    PatchScratch<T> s(p, false);
    double* acc = red.slot(begin);
    for (int64_t bi = begin; bi < end; ++bi)
      for (int64_t ti = p.plan.bands[bi].first_tile; ti < p.plan.bands[bi].end_tile; ++ti) {
        const Tile& t = p.plan.tiles[ti];
        for (int64_t chunk = 0; chunk < p.chunks(); ++chunk) {
          p.pack(t, chunk, s.chunk.ptr(), s.P, false);
          add_moments(s.chunk.ptr(), p.R, t.lanes(), s.P, acc, K0, p.chunk_channels[chunk].data());
        }
      }
  });
  return red.total();
}

// training: the output of layer l - 1 (l >= 1) into hidden (B, in[l], H, W), and its sums; reads the saved
// output of layer l - 2 when l >= 2
template <class T>
std::vector<double> patchwise_hidden_sums(const Patchwise<T>& p, int64_t l, const T* below, T* hidden) {
  const Mapping<T>& m = p.map;
  const int64_t channels = m.in[l];
  Reduction red(2 * channels);
  torch::stable::parallel_for(0, p.plan.bands.size(), 1, [&](int64_t begin, int64_t end) {
    PatchScratch<T> s(p, false);
    double* acc = red.slot(begin);
    for (int64_t bi = begin; bi < end; ++bi)
      for (int64_t ti = p.plan.bands[bi].first_tile; ti < p.plan.bands[bi].end_tile; ++ti) {
        const Tile& t = p.plan.tiles[ti];
        const int64_t n = padded_lanes<T>(t.lanes());
        if (l == 1) {
          patch_first_layer(p, t, s, s.hidden.ptr(), Epilogue<T>());
        } else {
          read_tile(below, m.in[l - 1], t, p.H, p.W, s.hidden.ptr(), s.P);
          normalize_relu(s.hidden.ptr(), s.act.ptr(), m.in[l - 1], n, s.P, m.scale[l - 1].data(),
                         m.shift[l - 1].data());
          gemm<T>(m.weight[l - 1], s.act.ptr(), s.P, s.hidden.ptr(), s.P, n, bias_epilogue(m, l - 1));
        }
        add_moments(s.hidden.ptr(), channels, t.lanes(), s.P, acc, channels);
        write_tile(s.hidden.ptr(), s.P, channels, t, p.H, p.W, hidden);
      }
  });
  return red.total();
}

template <class T>
struct PatchGrads {
  T* x1;  // (B, R, H, W)
  T* x2;  // padded (B, R, Hp, Wp)
  T* x3;  // padded (B, C, Hp, Wp)
  std::vector<std::vector<double>> weight, bias, norm;
};

// Backward pass for norm `lowest` (>= 1): the gradient at its activation's input gz, saved to grad_below
// (B, in[lowest], H, W), and its reductions; the weight gradients of layer `lowest`. hidden[l]: saved input of
// norm l (l >= 1); grad_above: saved gz of norm lowest + 1 (null in the top pass, which starts at the aggregation).
template <class T>
void patchwise_backward_upper(const Patchwise<T>& p, const MapView<T>& grad_out, int64_t lowest,
                              const std::vector<const T*>& hidden, const T* grad_above, T* grad_below,
                              PatchGrads<T>& g) {
  const Mapping<T>& m = p.map;
  const int64_t L = m.layers, top = L - 1;
  const bool first = lowest == top;
  const int64_t in_l = m.in[lowest], out_l = m.out[lowest];
  Reduction red(2 * in_l + out_l * in_l + out_l);
  BandScatter<T> scatter3(p.plan, p.C, g.x3, false);
  torch::stable::parallel_for(0, p.plan.bands.size(), 1, [&](int64_t begin, int64_t end) {
    PatchScratch<T> s(p, true);
    double* acc = red.slot(begin);
    double* w_acc = acc + 2 * in_l;
    double* b_acc = w_acc + out_l * in_l;
    OuterProduct<T> outer(out_l, in_l, s.P);
    Buffer<T> canvas3_buffer;
    T* canvas3 = nullptr;
    for (int64_t bi = begin; bi < end; ++bi) {
      const Band& band = p.plan.bands[bi];
      if (first) canvas3 = zeroed(canvas3_buffer, scatter3.canvas_size(band));
      for (int64_t ti = band.first_tile; ti < band.end_tile; ++ti) {
        const Tile& t = p.plan.tiles[ti];
        const int64_t lanes = t.lanes(), n = padded_lanes<T>(lanes), P = s.P;
        // the layer's input activation and the gradient of its output
        read_tile(hidden[lowest], in_l, t, p.H, p.W, s.hidden.ptr(), P);
        normalize_relu(s.hidden.ptr(), s.act.ptr(), in_l, n, P, m.scale[lowest].data(), m.shift[lowest].data());
        if (first) {
          gemm<T>(m.weight[top], s.act.ptr(), P, s.logits.ptr(), P, n, bias_epilogue(m, top));
          patch_weights_extended(p, t, s.logits.ptr(), s);
          map_to_extended(grad_out, t, p.Wp, s.g_ext.ptr(), s.E);
          aggregate_weight_grad(p.agg, t, p.x3p.ptr(), s.g_ext.ptr(), s.E, s.x_ext.ptr());
          aggregate_input_grad(p.agg, t, band.h0, s.w_ext.ptr(), s.g_ext.ptr(), s.E, canvas3,
                               band.h1 - band.h0 + 2 * p.pad);
          for (int64_t j = 0; j < p.KK; ++j)
            for (int64_t cw = 0; cw < p.Cw; ++cw)
              from_extended(s.x_ext.ptr() + (j * p.Cw + cw) * s.E, s.E, s.grads.ptr() + (cw * p.KK + j) * P, P, 1,
                            t, p.Wp);
        } else {
          read_tile(grad_above, m.in[lowest + 1], t, p.H, p.W, s.grad_a.ptr(), P);
          read_tile(hidden[lowest + 1], m.in[lowest + 1], t, p.H, p.W, s.logits.ptr(), P);
          norm_input_grad(s.grad_a.ptr(), s.logits.ptr(), s.grads.ptr(), m.in[lowest + 1], lanes, n, P, m,
                          lowest + 1, g.norm[lowest + 1], p.count());
        }
        outer.set_left(s.grads.ptr(), P, lanes);
        outer.add(s.act.ptr(), P, lanes);
        outer.flush(w_acc);
        add_row_sums(s.grads.ptr(), out_l, lanes, P, b_acc);
        gemm<T>(m.weight_t[lowest], s.grads.ptr(), P, s.grad_a.ptr(), P, n, Epilogue<T>());
        relu_norm_sums(s.grad_a.ptr(), s.act.ptr(), s.hidden.ptr(), in_l, lanes, n, P, m, lowest, acc);
        write_tile(s.grad_a.ptr(), P, in_l, t, p.H, p.W, grad_below);
      }
      if (first) scatter3.flush(bi, canvas3);
    }
  });
  if (first) scatter3.merge();
  const std::vector<double> sums = red.total();
  g.norm[lowest].assign(sums.begin(), sums.begin() + 2 * in_l);
  g.weight[lowest].assign(sums.begin() + 2 * in_l, sums.begin() + 2 * in_l + out_l * in_l);
  g.bias[lowest].assign(sums.begin() + 2 * in_l + out_l * in_l, sums.end());
}

// Backward through layer 0 (the footprint's) to norm 0: its weight gradient, norm 0's reductions, and scale * gz
// scattered onto x1 and x2 (correction = false); or (correction = true) the closing pass, norm 0's
// alpha + beta * relation scattered the same way. The gradient of layer 0's output comes from grad_above (the
// saved gz of norm 1) or, for a one-layer mapping, from the aggregation.
template <class T>
void patchwise_backward_first(const Patchwise<T>& p, const MapView<T>& grad_out, const std::vector<const T*>& hidden,
                              const T* grad_above, PatchGrads<T>& g, bool correction) {
  const Mapping<T>& m = p.map;
  const int64_t L = m.layers, K0 = p.relation_channels(), out0 = m.out[0], R = p.R;
  std::vector<T> alpha, beta;
  if (correction) norm_correction(m, 0, g.norm[0], p.count(), alpha, beta);
  Reduction red(correction ? 0 : 2 * K0 + out0 * K0 + out0);
  BandScatter<T> scatter3(p.plan, p.C, g.x3, false);
  BandScatter<T> scatter2(p.plan, R, g.x2, correction);
  const bool with_aggregation = L == 1 && !correction;
  torch::stable::parallel_for(0, p.plan.bands.size(), 1, [&](int64_t begin, int64_t end) {
    PatchScratch<T> s(p, true);
    double* acc = correction ? nullptr : red.slot(begin);
    // layer 0's weight gradient, one product per tile: the chunks' activations transposed side by side (column
    // chunk * R + c), their relation channels restored at the flush
    OuterProduct<T> outer(out0, K0, s.P);
    Buffer<T> canvas2_buffer, canvas3_buffer, gx1_tile;
    T* canvas3 = nullptr;
    Buffer<T> raw(padded_rows(R) * s.P), act(padded_rows(R) * s.P);
    for (int64_t bi = begin; bi < end; ++bi) {
      const Band& band = p.plan.bands[bi];
      const int64_t canvas_rows = band.h1 - band.h0 + 2 * p.pad;
      T* canvas2 = zeroed(canvas2_buffer, scatter2.canvas_size(band));
      if (with_aggregation) canvas3 = zeroed(canvas3_buffer, scatter3.canvas_size(band));
      for (int64_t ti = band.first_tile; ti < band.end_tile; ++ti) {
        const Tile& t = p.plan.tiles[ti];
        const int64_t lanes = t.lanes(), n = padded_lanes<T>(lanes), P = s.P;
        zeroed(gx1_tile, R * P);
        if (!correction) {
          if (with_aggregation) {
            patch_first_layer(p, t, s, s.logits.ptr(), Epilogue<T>());
            patch_weights_extended(p, t, s.logits.ptr(), s);
            map_to_extended(grad_out, t, p.Wp, s.g_ext.ptr(), s.E);
            aggregate_weight_grad(p.agg, t, p.x3p.ptr(), s.g_ext.ptr(), s.E, s.x_ext.ptr());
            aggregate_input_grad(p.agg, t, band.h0, s.w_ext.ptr(), s.g_ext.ptr(), s.E, canvas3, canvas_rows);
            for (int64_t j = 0; j < p.KK; ++j)
              for (int64_t cw = 0; cw < p.Cw; ++cw)
                from_extended(s.x_ext.ptr() + (j * p.Cw + cw) * s.E, s.E, s.grads.ptr() + (cw * p.KK + j) * P, P,
                              1, t, p.Wp);
          } else {
            read_tile(grad_above, m.in[1], t, p.H, p.W, s.grad_a.ptr(), P);
            read_tile(hidden[1], m.in[1], t, p.H, p.W, s.hidden.ptr(), P);
            norm_input_grad(s.grad_a.ptr(), s.hidden.ptr(), s.grads.ptr(), m.in[1], lanes, n, P, m, 1, g.norm[1],
                            p.count());
          }
          add_row_sums(s.grads.ptr(), out0, lanes, P, acc + 2 * K0 + out0 * K0);
          outer.set_left(s.grads.ptr(), P, lanes);
        }
        for (int64_t chunk = 0; chunk < p.chunks(); ++chunk) {
          p.pack(t, chunk, raw.ptr(), P, false);
          const int64_t* channels = p.chunk_channels[chunk].data();
          if (correction) {
            for (int64_t c = 0; c < R; ++c) {
              const T a = alpha[channels[c]], b = beta[channels[c]];
              T* row = raw.ptr() + c * P;
              for (int64_t q = 0; q < n; ++q) row[q] = a + b * row[q];
            }
            p.chunk_backward(t, chunk, raw.ptr(), P, gx1_tile.ptr(), canvas2, band.h0, canvas_rows);
            continue;
          }
          for (int64_t c = 0; c < R; ++c)
            normalize_relu(raw.ptr() + c * P, act.ptr() + c * P, 1, n, P, &m.scale[0][channels[c]],
                           &m.shift[0][channels[c]]);
          outer.set_right(act.ptr(), P, R, lanes, chunk * R);
          gemm<T>(p.chunk_wt[chunk], s.grads.ptr(), P, s.grad_a.ptr(), P, n, Epilogue<T>());
          // relu, norm 0's reductions and scale * gz
          relu_norm_sums(s.grad_a.ptr(), act.ptr(), raw.ptr(), R, lanes, n, P, m, 0, acc, channels, true);
          p.chunk_backward(t, chunk, s.grad_a.ptr(), P, gx1_tile.ptr(), canvas2, band.h0, canvas_rows);
        }
        if (!correction) {
          outer.multiply(lanes);
          outer.flush(acc + 2 * K0, K0, [&](int64_t column) { return p.channel(column / R, column % R); });
        }
        add_tile_to_map(gx1_tile.ptr(), P, R, t, p.H, p.W, g.x1);
      }
      scatter2.flush(bi, canvas2);
      if (with_aggregation) scatter3.flush(bi, canvas3);
    }
  });
  scatter2.merge();
  if (with_aggregation) scatter3.merge();
  if (correction) return;
  const std::vector<double> sums = red.total();
  g.norm[0].assign(sums.begin(), sums.begin() + 2 * K0);
  g.weight[0].assign(sums.begin() + 2 * K0, sums.begin() + 2 * K0 + out0 * K0);
  g.bias[0].assign(sums.begin() + 2 * K0 + out0 * K0, sums.end());
}

}  // namespace san
