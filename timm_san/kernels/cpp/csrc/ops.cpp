// The CPU kernels of SAN's attention as operators of the `timm_san_cpp` namespace, on PyTorch's stable ABI (one
// build serves every torch release from 2.10 on). They take the attention's maps after its three 1x1 convs and the
// mapping's tensors, and run one parallel loop per pass over bands of rows (torch's own thread pool). An absent
// optional tensor (a conv without bias, a norm without affine) is an empty one.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <tuple>
#include <vector>

#include "pairwise.h"
#include "patchwise.h"
#include "pool.h"

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

namespace san {
namespace {

bool absent(const Tensor& t) { return !t.defined() || t.numel() == 0; }

template <class T>
const T* ptr(const Tensor& t) {
  return absent(t) ? nullptr : static_cast<const T*>(t.data_ptr());
}

// a (B, C, H, W) map whose planes are contiguous (a channel slice of a contiguous map qualifies)
template <class T>
MapView<T> map_view(const Tensor& x, const char* name) {
  STD_TORCH_CHECK(x.dim() == 4, name, " must be a 4-D map, got ", x.dim(), " dims");
  STD_TORCH_CHECK(x.stride(3) == 1 && x.stride(2) == x.size(3) && x.stride(1) == x.size(2) * x.size(3),
                  name, " must have contiguous planes (a channel slice of a contiguous NCHW map)");
  return MapView<T>{static_cast<const T*>(x.data_ptr()), x.size(0), x.stride(0), x.size(1), x.size(2), x.size(3)};
}

// the mapping's layers: weights (out, in, 1, 1), biases (out,) or empty
template <class T>
void set_layers(Mapping<T>& m, const std::vector<Tensor>& weights, const std::vector<Tensor>& biases) {
  STD_TORCH_CHECK(!weights.empty() && weights.size() == biases.size(), "one bias (or empty tensor) per layer");
  std::vector<const T*> w, b;
  std::vector<int64_t> ins, outs;
  for (size_t l = 0; l < weights.size(); ++l) {
    STD_TORCH_CHECK(weights[l].is_contiguous(), "mapping weights must be contiguous");
    w.push_back(ptr<T>(weights[l]));
    b.push_back(ptr<T>(biases[l]));
    outs.push_back(weights[l].size(0));
    ins.push_back(weights[l].numel() / weights[l].size(0));
  }
  m.set_layers(w, b, ins, outs);
}

// norms: per layer [weight, bias, running_mean, running_var] (eval) or [weight, bias] (training), empty if absent
template <class T>
void set_running_norms(Mapping<T>& m, const std::vector<Tensor>& norms, const std::vector<double>& eps) {
  STD_TORCH_CHECK(norms.size() == size_t(4 * m.layers) && eps.size() == size_t(m.layers),
                  "eval norms: weight, bias, running_mean, running_var and an eps per layer");
  for (int64_t l = 0; l < m.layers; ++l)
    m.set_running_norm(l, ptr<T>(norms[4 * l]), ptr<T>(norms[4 * l + 1]), ptr<T>(norms[4 * l + 2]),
                       ptr<T>(norms[4 * l + 3]), eps[l]);
}

// saved statistics (float64): per layer [mean (in), biased var (in)]
template <class T>
void set_saved_norms(Mapping<T>& m, const std::vector<Tensor>& norms, const Tensor& saved,
                     const std::vector<double>& eps) {
  const double* s = static_cast<const double*>(saved.data_ptr());
  for (int64_t l = 0; l < m.layers; ++l) {
    const int64_t n = m.in[l];
    std::vector<double> inv(n);
    for (int64_t c = 0; c < n; ++c) inv[c] = 1.0 / std::sqrt(s[n + c] + eps[l]);
    m.set_norm(l, ptr<T>(norms[2 * l]), ptr<T>(norms[2 * l + 1]), s, inv.data());
    s += 2 * n;
  }
}

int64_t saved_size(const std::vector<Tensor>& weights) {
  int64_t n = 0;
  for (const Tensor& w : weights) n += 2 * (w.numel() / w.size(0));
  return n;
}

template <class T>
Tensor new_map(const Tensor& like, int64_t b, int64_t c, int64_t h, int64_t w) {
  return torch::stable::new_empty(like, {b, c, h, w});
}

// ---- pairwise

// bytes of a backward tile's hidden layers kept between its two sweeps (about half a core's L2 cache)
constexpr int64_t kStoredBytes = 512 << 10;

template <class T>
Pairwise<T> make_pairwise(const Tensor& x1, const Tensor& x2, const Tensor& x3, const Tensor& position,
                          int64_t kernel_size, int64_t relation, const std::vector<Tensor>& weights,
                          const std::vector<Tensor>& biases, bool backward = false) {
  const Tensor& last = weights.back();
  std::vector<int64_t> ins;
  for (const Tensor& w : weights) ins.push_back(w.numel() / w.size(0));
  // keep the relation too where that still leaves the widest tiles, else the hidden layers alone if they fit
  const int64_t widest = kBlock * Vec<T>::lanes, offsets = kernel_size * kernel_size;
  int64_t from = 0, stored = backward ? stored_lanes<T>(ins, 0, offsets, kStoredBytes) : 0;
  if (backward && stored < widest) {
    from = 1;
    stored = stored_lanes<T>(ins, 1, offsets, kStoredBytes);
  }
  Pairwise<T> p(map_view<T>(x1, "x1"), map_view<T>(x2, "x2"), map_view<T>(x3, "x3"), ptr<T>(position), relation,
                kernel_size, last.size(0), torch::stable::get_num_threads(), stored ? stored : widest, backward);
  p.store_hidden = stored > 0;
  p.store_from = from;
  set_layers(p.map, weights, biases);
  STD_TORCH_CHECK(p.map.in[0] == p.in_channels, "the mapping's first layer takes ", p.map.in[0],
                  " channels, the relation has ", p.in_channels);
  return p;
}

template <class T>
Tensor pairwise_eval_t(const Tensor& x1, const Tensor& x2, const Tensor& x3, const Tensor& position,
                       const std::vector<Tensor>& norms, const std::vector<double>& eps,
                       const std::vector<Tensor>& weights, const std::vector<Tensor>& biases, int64_t kernel_size,
                       int64_t relation) {
  Pairwise<T> p = make_pairwise<T>(x1, x2, x3, position, kernel_size, relation, weights, biases);
  set_running_norms(p.map, norms, eps);
  Tensor out = new_map<T>(x1, p.B, p.C, p.H, p.W);
  pairwise_forward(p, static_cast<T*>(out.data_ptr()));
  return out;
}

template <class T>
std::tuple<Tensor, Tensor> pairwise_train_t(const Tensor& x1, const Tensor& x2, const Tensor& x3,
                                            const Tensor& position, const std::vector<Tensor>& norms,
                                            const std::vector<double>& eps, const std::vector<Tensor>& weights,
                                            const std::vector<Tensor>& biases, int64_t kernel_size,
                                            int64_t relation) {
  Pairwise<T> p = make_pairwise<T>(x1, x2, x3, position, kernel_size, relation, weights, biases);
  Tensor saved = torch::stable::new_empty(x1, {saved_size(weights)}, ScalarType::Double);
  double* s = static_cast<double*>(saved.data_ptr());
  for (int64_t l = 0; l < p.map.layers; ++l) {
    const std::vector<double> sums = pairwise_norm_sums(p, l);
    p.map.set_batch_norm(l, ptr<T>(norms[2 * l]), ptr<T>(norms[2 * l + 1]), sums.data(), p.count(), eps[l]);
    const int64_t n = p.map.in[l];
    for (int64_t c = 0; c < n; ++c) {
      s[c] = p.map.mean[l][c];
      s[n + c] = 1.0 / (p.map.invstd[l][c] * p.map.invstd[l][c]) - eps[l];
    }
    s += 2 * n;
  }
  Tensor out = new_map<T>(x1, p.B, p.C, p.H, p.W);
  pairwise_forward(p, static_cast<T*>(out.data_ptr()));
  return std::make_tuple(out, saved);
}

// [grad_x1, grad_x2, grad_x3, grad_position (or empty), then per layer: norm weight, norm bias, conv weight, conv
// bias gradients]
template <class T>
std::vector<Tensor> pairwise_backward_t(const Tensor& grad_out, const Tensor& x1, const Tensor& x2, const Tensor& x3,
                                        const Tensor& position, const std::vector<Tensor>& norms,
                                        const std::vector<double>& eps, const Tensor& saved,
                                        const std::vector<Tensor>& weights, const std::vector<Tensor>& biases,
                                        int64_t kernel_size, int64_t relation) {
  Pairwise<T> p = make_pairwise<T>(x1, x2, x3, position, kernel_size, relation, weights, biases, true);
  set_saved_norms(p.map, norms, saved, eps);
  const int64_t B = p.B, R = p.R, C = p.C, H = p.H, W = p.W, Hp = p.Hp, Wp = p.Wp, L = p.map.layers;
  Tensor gx1 = torch::stable::new_zeros(x1, {B, R, H, W});
  Buffer<T> gx2p(B * R * Hp * Wp), gx3p(B * C * Hp * Wp);
  PairGrads<T> g{static_cast<T*>(gx1.data_ptr()), gx2p.ptr(), gx3p.ptr(), {}, {}, {}, {}};
  g.weight.resize(L);
  g.bias.resize(L);
  g.norm.resize(L);
  const MapView<T> go = map_view<T>(grad_out, "grad_out");
  for (int64_t lowest = L - 1; lowest >= 0; --lowest) pairwise_backward_pass(p, go, lowest, g);
  pairwise_correction_pass(p, g);
  std::vector<Tensor> out;
  Tensor gx2 = new_map<T>(x1, B, R, H, W), gx3 = new_map<T>(x1, B, C, H, W);
  fold_padding(gx2p.ptr(), B * R, H, W, p.pad, static_cast<T*>(gx2.data_ptr()));
  fold_padding(gx3p.ptr(), B * C, H, W, p.pad, static_cast<T*>(gx3.data_ptr()));
  out.push_back(gx1);
  out.push_back(gx2);
  out.push_back(gx3);
  if (p.position) {
    Tensor gpos = new_map<T>(x1, 1, 2, H, W);
    fold_padding(g.position.data(), 2, H, W, p.pad, static_cast<T*>(gpos.data_ptr()));
    out.push_back(gpos);
  } else {
    out.push_back(torch::stable::new_empty(x1, {0}));
  }
  auto vector_tensor = [&](const std::vector<double>& v, int64_t from, int64_t count, std::vector<int64_t> shape) {
    Tensor t = torch::stable::new_empty(x1, shape);
    T* d = static_cast<T*>(t.data_ptr());
    for (int64_t i = 0; i < count; ++i) d[i] = T(v[from + i]);
    return t;
  };
  for (int64_t l = 0; l < L; ++l) {
    const int64_t in = p.map.in[l], o = p.map.out[l];
    out.push_back(vector_tensor(g.norm[l], in, in, {in}));   // gamma: sum gz * hhat
    out.push_back(vector_tensor(g.norm[l], 0, in, {in}));    // beta: sum gz
    out.push_back(vector_tensor(g.weight[l], 0, o * in, {o, in, 1, 1}));
    out.push_back(vector_tensor(g.bias[l], 0, o, {o}));
  }
  return out;
}

// ---- patchwise

template <class T>
Patchwise<T> make_patchwise(const Tensor& x1, const Tensor& x2, const Tensor& x3, int64_t kernel_size,
                            int64_t relation, const std::vector<Tensor>& weights, const std::vector<Tensor>& biases,
                            bool backward = false) {
  const int64_t offsets = kernel_size * kernel_size;
  Patchwise<T> p(map_view<T>(x1, "x1"), map_view<T>(x2, "x2"), map_view<T>(x3, "x3"), relation, kernel_size,
                 weights.back().size(0) / offsets, torch::stable::get_num_threads(), backward);
  set_layers(p.map, weights, biases);
  STD_TORCH_CHECK(p.map.in[0] == p.relation_channels(), "the mapping's first layer takes ", p.map.in[0],
                  " channels, the relation has ", p.relation_channels());
  STD_TORCH_CHECK(p.map.out.back() == offsets * p.Cw, "the mapping's last layer must give k * k * Cw channels");
  p.pack_chunks(ptr<T>(weights[0]));
  return p;
}

template <class T>
Tensor patchwise_eval_t(const Tensor& x1, const Tensor& x2, const Tensor& x3, const std::vector<Tensor>& norms,
                        const std::vector<double>& eps, const std::vector<Tensor>& weights,
                        const std::vector<Tensor>& biases, int64_t kernel_size, int64_t relation) {
  Patchwise<T> p = make_patchwise<T>(x1, x2, x3, kernel_size, relation, weights, biases);
  set_running_norms(p.map, norms, eps);
  Tensor out = new_map<T>(x1, p.B, p.C, p.H, p.W);
  patchwise_forward(p, static_cast<T*>(out.data_ptr()), static_cast<const T*>(nullptr));
  return out;
}

// the saved inputs of norms 1 .. L - 1, channel blocks of one (B, sum, H, W) map
template <class T>
std::vector<T*> hidden_blocks(const Patchwise<T>& p, T* base) {
  std::vector<T*> out(p.map.layers, nullptr);
  for (int64_t l = 1; l < p.map.layers; ++l) {
    out[l] = base;
    base += p.B * p.map.in[l] * p.H * p.W;
  }
  return out;
}

template <class T>
int64_t hidden_channels(const Patchwise<T>& p) {
  int64_t n = 0;
  for (int64_t l = 1; l < p.map.layers; ++l) n += p.map.in[l];
  return n;
}

template <class T>
std::tuple<Tensor, Tensor, Tensor> patchwise_train_t(const Tensor& x1, const Tensor& x2, const Tensor& x3,
                                                     const std::vector<Tensor>& norms, const std::vector<double>& eps,
                                                     const std::vector<Tensor>& weights,
                                                     const std::vector<Tensor>& biases, int64_t kernel_size,
                                                     int64_t relation) {
  Patchwise<T> p = make_patchwise<T>(x1, x2, x3, kernel_size, relation, weights, biases);
  const int64_t L = p.map.layers;
  Tensor saved = torch::stable::new_empty(x1, {saved_size(weights)}, ScalarType::Double);
  // hidden maps stored one after another (each (B, in[l], H, W)), as one flat tensor
  Tensor hidden = torch::stable::new_empty(x1, {p.B * hidden_channels(p) * p.H * p.W});
  std::vector<T*> blocks = hidden_blocks(p, static_cast<T*>(hidden.data_ptr()));
  double* s = static_cast<double*>(saved.data_ptr());
  for (int64_t l = 0; l < L; ++l) {
    const std::vector<double> sums =
        l == 0 ? patchwise_relation_sums(p) : patchwise_hidden_sums(p, l, l >= 2 ? blocks[l - 1] : nullptr, blocks[l]);
    p.map.set_batch_norm(l, ptr<T>(norms[2 * l]), ptr<T>(norms[2 * l + 1]), sums.data(), p.count(), eps[l]);
    const int64_t n = p.map.in[l];
    for (int64_t c = 0; c < n; ++c) {
      s[c] = p.map.mean[l][c];
      s[n + c] = 1.0 / (p.map.invstd[l][c] * p.map.invstd[l][c]) - eps[l];
    }
    s += 2 * n;
  }
  Tensor out = new_map<T>(x1, p.B, p.C, p.H, p.W);
  patchwise_forward(p, static_cast<T*>(out.data_ptr()), L > 1 ? static_cast<const T*>(blocks[L - 1]) : nullptr);
  return std::make_tuple(out, saved, hidden);
}

template <class T>
std::vector<Tensor> layer_grads(const Tensor& like, const Mapping<T>& m, const std::vector<std::vector<double>>& norm,
                                const std::vector<std::vector<double>>& weight,
                                const std::vector<std::vector<double>>& bias) {
  std::vector<Tensor> out;
  auto vector_tensor = [&](const std::vector<double>& v, int64_t from, int64_t count, std::vector<int64_t> shape) {
    Tensor t = torch::stable::new_empty(like, shape);
    T* d = static_cast<T*>(t.data_ptr());
    for (int64_t i = 0; i < count; ++i) d[i] = T(v[from + i]);
    return t;
  };
  for (int64_t l = 0; l < m.layers; ++l) {
    const int64_t in = m.in[l], o = m.out[l];
    out.push_back(vector_tensor(norm[l], in, in, {in}));  // norm weight: sum gz * hhat
    out.push_back(vector_tensor(norm[l], 0, in, {in}));   // norm bias: sum gz
    out.push_back(vector_tensor(weight[l], 0, o * in, {o, in, 1, 1}));
    out.push_back(vector_tensor(bias[l], 0, o, {o}));
  }
  return out;
}

// [grad_x1, grad_x2, grad_x3, then per layer: norm weight, norm bias, conv weight, conv bias gradients]
template <class T>
std::vector<Tensor> patchwise_backward_t(const Tensor& grad_out, const Tensor& x1, const Tensor& x2, const Tensor& x3,
                                         const std::vector<Tensor>& norms, const std::vector<double>& eps,
                                         const Tensor& saved, const Tensor& hidden, const std::vector<Tensor>& weights,
                                         const std::vector<Tensor>& biases, int64_t kernel_size, int64_t relation) {
  Patchwise<T> p = make_patchwise<T>(x1, x2, x3, kernel_size, relation, weights, biases, true);
  set_saved_norms(p.map, norms, saved, eps);
  const int64_t B = p.B, R = p.R, C = p.C, H = p.H, W = p.W, L = p.map.layers;
  std::vector<T*> blocks = hidden_blocks(p, static_cast<T*>(hidden.data_ptr()));
  std::vector<const T*> hidden_maps(blocks.begin(), blocks.end());
  std::vector<Buffer<T>> gz(L);
  for (int64_t l = 1; l < L; ++l) gz[l] = Buffer<T>(B * p.map.in[l] * H * W);
  Tensor gx1 = torch::stable::new_zeros(x1, {B, R, H, W});
  Buffer<T> gx2p(B * R * p.Hp * p.Wp), gx3p(B * C * p.Hp * p.Wp);
  PatchGrads<T> g{static_cast<T*>(gx1.data_ptr()), gx2p.ptr(), gx3p.ptr(), {}, {}, {}};
  g.weight.resize(L);
  g.bias.resize(L);
  g.norm.resize(L);
  const MapView<T> go = map_view<T>(grad_out, "grad_out");
  for (int64_t lowest = L - 1; lowest >= 1; --lowest)
    patchwise_backward_upper(p, go, lowest, hidden_maps, lowest + 1 < L ? gz[lowest + 1].ptr() : nullptr,
                             gz[lowest].ptr(), g);
  patchwise_backward_first(p, go, hidden_maps, L > 1 ? gz[1].ptr() : nullptr, g, false);
  patchwise_backward_first(p, go, hidden_maps, L > 1 ? gz[1].ptr() : nullptr, g, true);
  Tensor gx2 = new_map<T>(x1, B, R, H, W), gx3 = new_map<T>(x1, B, C, H, W);
  fold_padding(gx2p.ptr(), B * R, H, W, p.pad, static_cast<T*>(gx2.data_ptr()));
  fold_padding(gx3p.ptr(), B * C, H, W, p.pad, static_cast<T*>(gx3.data_ptr()));
  std::vector<Tensor> out{gx1, gx2, gx3};
  for (Tensor& t : layer_grads<T>(x1, p.map, g.norm, g.weight, g.bias)) out.push_back(t);
  return out;
}

template <class F>
auto by_dtype(const Tensor& x, F f) {
  STD_TORCH_CHECK(x.is_cpu(), "timm_san_cpp kernels take CPU tensors");
  if (x.scalar_type() == ScalarType::Float) return f(float());
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Double, "timm_san_cpp kernels take float32 or float64 maps");
  return f(double());
}

Tensor pairwise_eval(Tensor x1, Tensor x2, Tensor x3, Tensor position, std::vector<Tensor> norms,
                     std::vector<double> eps, std::vector<Tensor> weights, std::vector<Tensor> biases,
                     int64_t kernel_size, int64_t relation) {
  return by_dtype(x1, [&](auto t) {
    return pairwise_eval_t<decltype(t)>(x1, x2, x3, position, norms, eps, weights, biases, kernel_size, relation);
  });
}

std::tuple<Tensor, Tensor> pairwise_train(Tensor x1, Tensor x2, Tensor x3, Tensor position,
                                          std::vector<Tensor> norms, std::vector<double> eps,
                                          std::vector<Tensor> weights, std::vector<Tensor> biases,
                                          int64_t kernel_size, int64_t relation) {
  return by_dtype(x1, [&](auto t) {
    return pairwise_train_t<decltype(t)>(x1, x2, x3, position, norms, eps, weights, biases, kernel_size, relation);
  });
}

std::vector<Tensor> pairwise_backward(Tensor grad_out, Tensor x1, Tensor x2, Tensor x3, Tensor position,
                                      std::vector<Tensor> norms, std::vector<double> eps, Tensor saved,
                                      std::vector<Tensor> weights, std::vector<Tensor> biases, int64_t kernel_size,
                                      int64_t relation) {
  return by_dtype(x1, [&](auto t) {
    return pairwise_backward_t<decltype(t)>(grad_out, x1, x2, x3, position, norms, eps, saved, weights, biases,
                                            kernel_size, relation);
  });
}

Tensor patchwise_eval(Tensor x1, Tensor x2, Tensor x3, std::vector<Tensor> norms, std::vector<double> eps,
                      std::vector<Tensor> weights, std::vector<Tensor> biases, int64_t kernel_size, int64_t relation) {
  return by_dtype(x1, [&](auto t) {
    return patchwise_eval_t<decltype(t)>(x1, x2, x3, norms, eps, weights, biases, kernel_size, relation);
  });
}

std::tuple<Tensor, Tensor, Tensor> patchwise_train(Tensor x1, Tensor x2, Tensor x3, std::vector<Tensor> norms,
                                                   std::vector<double> eps, std::vector<Tensor> weights,
                                                   std::vector<Tensor> biases, int64_t kernel_size, int64_t relation) {
  return by_dtype(x1, [&](auto t) {
    return patchwise_train_t<decltype(t)>(x1, x2, x3, norms, eps, weights, biases, kernel_size, relation);
  });
}

std::vector<Tensor> patchwise_backward(Tensor grad_out, Tensor x1, Tensor x2, Tensor x3, std::vector<Tensor> norms,
                                       std::vector<double> eps, Tensor saved, Tensor hidden,
                                       std::vector<Tensor> weights, std::vector<Tensor> biases, int64_t kernel_size,
                                       int64_t relation) {
  return by_dtype(x1, [&](auto t) {
    return patchwise_backward_t<decltype(t)>(grad_out, x1, x2, x3, norms, eps, saved, hidden, weights, biases,
                                             kernel_size, relation);
  });
}

// ---- 1x1 convs

// out (B, M, H, W) = weight (M, K) . x[b] (K, H * W) + bias, column tiles of every sample in parallel; the weight
// packed once into panels, x read in place (its rows are the product's B rows)
Tensor conv1x1(Tensor x, Tensor weight, Tensor bias) {
  STD_TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && weight.is_contiguous(), "conv1x1 takes contiguous maps");
  const int64_t B = x.size(0), K = x.size(1), N = x.size(2) * x.size(3), M = weight.size(0);
  Tensor out = torch::stable::new_empty(x, {B, M, x.size(2), x.size(3)});
  by_dtype(x, [&](auto t) {
    using T = decltype(t);
    constexpr int64_t L = Vec<T>::lanes, tile = kBlock * L;
    const Packed<T> w(static_cast<const T*>(weight.data_ptr()), M, K, K, 1);
    const std::vector<T> b = padded_vector<T>(ptr<T>(bias), M);
    const T* X = static_cast<const T*>(x.data_ptr());
    T* O = static_cast<T*>(out.data_ptr());
    const int64_t tiles = (N + tile - 1) / tile;
    // few tiles (a small batch of small maps): the output's rows split too, in blocks of whole panels
    const int64_t threads = torch::stable::get_num_threads(), panel = panel_rows(M), panels = padded_rows(M) / panel;
    const int64_t blocks = std::min(panels, std::max<int64_t>(1, 2 * threads / std::max<int64_t>(1, B * tiles)));
    const int64_t block_panels = (panels + blocks - 1) / blocks;
    torch::stable::parallel_for(0, B * tiles * blocks, 1, [&](int64_t begin, int64_t end) {
      Buffer<T> c(padded_rows(M) * tile), xb(K * tile);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t item = i / blocks, r0 = (i % blocks) * block_panels * panel;
        const int64_t rows = std::min(M - r0, block_panels * panel);
        if (rows <= 0) continue;
        const int64_t s = item / tiles, n0 = (item % tiles) * tile, n = std::min(tile, N - n0);
        const T* src = X + s * K * N + n0;
        Epilogue<T> ep;
        ep.bias = b.data() + r0;
        const T* a = w.ptr() + r0 * K;  // whole panels: the packed rows of panel r0 / panel on
        const int64_t rows_padded = std::min(padded_rows(M) - r0, block_panels * panel);
        if (n == tile) {
          gemm_rows<T>(a, rows_padded, panel, K, src, N, c.ptr(), tile, tile, ep);
        } else {  // the last columns, copied out so that whole vectors can be read
          for (int64_t k = 0; k < K; ++k) {
            std::copy(src + k * N, src + k * N + n, xb.ptr() + k * tile);
            std::fill(xb.ptr() + k * tile + n, xb.ptr() + (k + 1) * tile, T(0));
          }
          gemm_rows<T>(a, rows_padded, panel, K, xb.ptr(), tile, c.ptr(), tile, padded_lanes<T>(n), ep);
        }
        for (int64_t r = 0; r < rows; ++r)
          std::copy(c.ptr() + r * tile, c.ptr() + r * tile + n, O + (s * M + r0 + r) * N + n0);
      }
    });
    return 0;
  });
  return out;
}

// ---- pools and the stem

Tensor max_pool2x2(Tensor x) {
  STD_TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "max_pool2x2 takes a contiguous 4-D map");
  Tensor out = torch::stable::new_empty(x, {x.size(0), x.size(1), x.size(2) / 2, x.size(3) / 2});
  by_dtype(x, [&](auto t) {
    using T = decltype(t);
    pool2x2_forward(static_cast<const T*>(x.data_ptr()), x.size(0) * x.size(1), x.size(2), x.size(3),
                        static_cast<T*>(out.data_ptr()));
    return 0;
  });
  return out;
}

Tensor max_pool2x2_backward(Tensor grad, Tensor x) {
  STD_TORCH_CHECK(x.is_contiguous() && grad.is_contiguous(), "max_pool2x2_backward takes contiguous maps");
  Tensor grad_x = torch::stable::new_empty(x, {x.size(0), x.size(1), x.size(2), x.size(3)});
  by_dtype(x, [&](auto t) {
    using T = decltype(t);
    pool2x2_backward(static_cast<const T*>(grad.data_ptr()), static_cast<const T*>(x.data_ptr()),
                         x.size(0) * x.size(1), x.size(2), x.size(3), static_cast<T*>(grad_x.data_ptr()));
    return 0;
  });
  return grad_x;
}

// (pooled map, winners (uint8; empty unless asked)) of the stem with the BatchNorm folded into matrix and shift
std::tuple<Tensor, Tensor> stem(Tensor x, Tensor matrix, Tensor shift, bool winners) {
  STD_TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && matrix.is_contiguous(), "stem takes a contiguous 4-D map");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = matrix.size(0);
  Tensor out = torch::stable::new_empty(x, {B, O, H / 2, W / 2});
  Tensor arg = torch::stable::new_empty(x, {winners ? B : 0, O, H / 2, W / 2}, ScalarType::Byte);
  by_dtype(x, [&](auto t) {
    using T = decltype(t);
    stem_pooled(static_cast<const T*>(x.data_ptr()), B, C, H, W, static_cast<const T*>(matrix.data_ptr()),
                 static_cast<const T*>(shift.data_ptr()), O, static_cast<T*>(out.data_ptr()),
                 winners ? static_cast<uint8_t*>(arg.data_ptr()) : nullptr);
    return 0;
  });
  return std::make_tuple(out, arg);
}

// (moment (O x C, float64), sum of the ReLU'd gradient (O, float64), grad_x (empty unless asked))
std::tuple<Tensor, Tensor, Tensor> stem_backward(Tensor grad, Tensor x, Tensor out, Tensor winners, Tensor mean,
                                                 Tensor folded, bool input_grad) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = out.size(1);
  Tensor moment = torch::stable::new_empty(x, {O, C}, ScalarType::Double);
  Tensor grad_shift = torch::stable::new_empty(x, {O}, ScalarType::Double);
  Tensor grad_x = torch::stable::new_empty(x, {input_grad ? B : 0, C, H, W});
  by_dtype(x, [&](auto t) {
    using T = decltype(t);
    stem_pooled_backward(static_cast<const T*>(grad.data_ptr()), static_cast<const T*>(x.data_ptr()),
                  static_cast<const T*>(out.data_ptr()), static_cast<const uint8_t*>(winners.data_ptr()), B, C, H, W,
                  O, static_cast<const T*>(mean.data_ptr()), static_cast<const T*>(folded.data_ptr()),
                  static_cast<double*>(moment.data_ptr()), static_cast<double*>(grad_shift.data_ptr()),
                  input_grad ? static_cast<T*>(grad_x.data_ptr()) : nullptr);
    return 0;
  });
  return std::make_tuple(moment, grad_shift, grad_x);
}

// cycles per phase summed since the last reset (zeros unless built with SAN_PROFILE), then reset if asked
Tensor profile_counters(Tensor like, bool reset) {
  Tensor out = torch::stable::new_zeros(like, {int64_t(kPhases)}, ScalarType::Double);
#ifdef SAN_PROFILE
  double* d = static_cast<double*>(out.data_ptr());
  for (int p = 0; p < kPhases; ++p) {
    d[p] = double(phase_counters()[p].load());
    if (reset) phase_counters()[p] = 0;
  }
#else
  (void)reset;
#endif
  return out;
}

// the kernels' scratch memory (bytes): [in use, peak in use since the last reset, kept free for reuse]
Tensor memory_stats(Tensor like, bool reset_peak) {
  size_t in_use, peak, cached;
  BufferPool::get().stats(in_use, peak, cached, reset_peak);
  Tensor out = torch::stable::new_empty(like, {3}, ScalarType::Double);
  double* d = static_cast<double*>(out.data_ptr());
  d[0] = double(in_use);
  d[1] = double(peak);
  d[2] = double(cached);
  return out;
}

}  // namespace
}  // namespace san

STABLE_TORCH_LIBRARY(timm_san_cpp, m) {
  m.def("pairwise_eval(Tensor x1, Tensor x2, Tensor x3, Tensor position, Tensor[] norms, float[] eps, "
        "Tensor[] weights, Tensor[] biases, int kernel_size, int relation) -> Tensor");
  m.def("pairwise_train(Tensor x1, Tensor x2, Tensor x3, Tensor position, Tensor[] norms, float[] eps, "
        "Tensor[] weights, Tensor[] biases, int kernel_size, int relation) -> (Tensor, Tensor)");
  m.def("pairwise_backward(Tensor grad_out, Tensor x1, Tensor x2, Tensor x3, Tensor position, Tensor[] norms, "
        "float[] eps, Tensor saved, Tensor[] weights, Tensor[] biases, int kernel_size, int relation) -> Tensor[]");
  m.def("conv1x1(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("max_pool2x2(Tensor x) -> Tensor");
  m.def("max_pool2x2_backward(Tensor grad, Tensor x) -> Tensor");
  m.def("stem(Tensor x, Tensor matrix, Tensor shift, bool winners) -> (Tensor, Tensor)");
  m.def("stem_backward(Tensor grad, Tensor x, Tensor out, Tensor winners, Tensor mean, Tensor folded, "
        "bool input_grad) -> (Tensor, Tensor, Tensor)");
  m.def("profile_counters(Tensor like, bool reset) -> Tensor");
  m.def("memory_stats(Tensor like, bool reset_peak) -> Tensor");
  m.def("patchwise_eval(Tensor x1, Tensor x2, Tensor x3, Tensor[] norms, float[] eps, Tensor[] weights, "
        "Tensor[] biases, int kernel_size, int relation) -> Tensor");
  m.def("patchwise_train(Tensor x1, Tensor x2, Tensor x3, Tensor[] norms, float[] eps, Tensor[] weights, "
        "Tensor[] biases, int kernel_size, int relation) -> (Tensor, Tensor, Tensor)");
  m.def("patchwise_backward(Tensor grad_out, Tensor x1, Tensor x2, Tensor x3, Tensor[] norms, float[] eps, "
        "Tensor saved, Tensor hidden, Tensor[] weights, Tensor[] biases, int kernel_size, int relation) -> Tensor[]");
}

STABLE_TORCH_LIBRARY_IMPL(timm_san_cpp, CPU, m) {
  m.impl("pairwise_eval", TORCH_BOX(&san::pairwise_eval));
  m.impl("pairwise_train", TORCH_BOX(&san::pairwise_train));
  m.impl("pairwise_backward", TORCH_BOX(&san::pairwise_backward));
  m.impl("patchwise_eval", TORCH_BOX(&san::patchwise_eval));
  m.impl("conv1x1", TORCH_BOX(&san::conv1x1));
  m.impl("max_pool2x2", TORCH_BOX(&san::max_pool2x2));
  m.impl("max_pool2x2_backward", TORCH_BOX(&san::max_pool2x2_backward));
  m.impl("stem", TORCH_BOX(&san::stem));
  m.impl("stem_backward", TORCH_BOX(&san::stem_backward));
  m.impl("profile_counters", TORCH_BOX(&san::profile_counters));
  m.impl("memory_stats", TORCH_BOX(&san::memory_stats));
  m.impl("patchwise_train", TORCH_BOX(&san::patchwise_train));
  m.impl("patchwise_backward", TORCH_BOX(&san::patchwise_backward));
}
