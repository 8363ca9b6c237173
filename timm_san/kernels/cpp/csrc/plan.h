// How a SAM call is cut into work: tiles of pixels (the lanes of every product), grouped into bands of rows that
// one thread owns from start to end; reflection-padded copies of the maps that neighbours are read from; and the
// band-local canvases that scatter gradients onto neighbours without two threads ever writing the same row.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include <torch/csrc/stable/ops.h>

#include "gemm.h"
#include "vec.h"

namespace san {

// a tile: `rows` rows of `len` pixels from column w0 (several rows only when they are whole rows of the map).
// Lane q of the tile is pixel (h0 + q / len, w0 + q % len); on the row-extended grid of a padded map (row stride
// Wp) the same pixel is at e = (q / len) * Wp + q % len, so a neighbour at offset (dh, dw) of every lane is one
// contiguous run of the padded map: padded[(h0 + dh) * Wp + w0 + dw + e].
struct Tile {
  int64_t b, h0, rows, w0, len;
  int64_t lanes() const { return rows * len; }
  int64_t extended(int64_t Wp) const { return (rows - 1) * Wp + len; }
};

// rows [h0, h1) of sample b and their tiles; one thread computes a band from start to end
struct Band {
  int64_t b, h0, h1, first_tile, end_tile;
};

struct Plan {
  int64_t batch, height, width, kernel_size, pad, padded_height, padded_width;
  int64_t max_lanes;     // lanes of the widest tile (a multiple of the vector width)
  int64_t max_extended;  // lanes of the widest tile on the row-extended grid (a multiple of the vector width)
  // row strides of the tile buffers, a vector longer than the widest tile: a whole-vector store that runs past a
  // tile's last lane lands in its own row's slack, never in the next row
  int64_t lane_stride, extended_stride;
  std::vector<Tile> tiles;
  std::vector<Band> bands;

  // lanes_max: lanes one tile may hold; scatter: the passes scatter gradients onto neighbours, which needs bands of
  // at least 2 * pad rows (BandScatter), else a band may be a single tile
  Plan(int64_t B, int64_t H, int64_t W, int64_t ks, int64_t lanes_max, int64_t vector_lanes, int64_t threads,
       bool scatter)
      : batch(B), height(H), width(W), kernel_size(ks), pad(ks / 2), padded_height(H + 2 * (ks / 2)),
        padded_width(W + 2 * (ks / 2)), max_extended(0) {
    threads = std::max<int64_t>(1, threads);
    // whole rows per tile on maps narrower than a tile, but never so few tiles that a thread idles
    int64_t rows = 1, segments = 1;
    if (W >= lanes_max) {
      segments = (W + lanes_max - 1) / lanes_max;
    } else {
      rows = std::max<int64_t>(1, std::min<int64_t>({lanes_max / W, H, (B * H + threads - 1) / threads}));
    }
    const int64_t seg_len = (W + segments - 1) / segments;
    max_lanes = (std::max(rows * W, seg_len) + vector_lanes - 1) / vector_lanes * vector_lanes;
    // bands: whole samples while there are enough of them, else shorter (at least one tile, and 2 * pad rows where
    // they scatter)
    const int64_t min_rows = std::min(H, std::max<int64_t>(scatter ? 2 * pad : 1, rows));
    int64_t band_rows = H;
    while (B * ((H + band_rows - 1) / band_rows) < 2 * threads && band_rows / 2 >= min_rows) band_rows /= 2;
    band_rows = std::max(min_rows, band_rows / rows * rows);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h0 = 0; h0 < H; h0 += band_rows) {
        int64_t h1 = std::min(H, h0 + band_rows);
        if (H - h1 < min_rows) h1 = H;  // the last band takes a short remainder
        Band band{b, h0, h1, int64_t(tiles.size()), 0};
        for (int64_t h = h0; h < h1; h += rows)
          for (int64_t w0 = 0; w0 < W; w0 += seg_len)
            tiles.push_back({b, h, std::min(rows, h1 - h), w0, std::min(seg_len, W - w0)});
        band.end_tile = tiles.size();
        lane_stride = max_lanes + vector_lanes;
        for (int64_t i = band.first_tile; i < band.end_tile; ++i)
          max_extended = std::max(max_extended, (tiles[i].extended(padded_width) + vector_lanes - 1) / vector_lanes *
                                                    vector_lanes);
        bands.push_back(band);
        if (h1 == H) break;
      }
    }
    extended_stride = max_extended + vector_lanes;
  }
};

// Source index of padded position i of a side of n padded by pad: reflection, repeated where pad >= n
inline int64_t reflect(int64_t i, int64_t n, int64_t pad) {
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  int64_t p = (i - pad) % period;
  if (p < 0) p += period;
  return p < n ? p : period - p;
}

// Freed buffers kept for reuse, process-wide: a fresh allocation of megabytes is returned to the system when freed
// and page-faults again on its first write, which costs as much as the arithmetic of a small map. Blocks are
// reused for requests of at least half their size; at most `limit` bytes are kept (TIMM_SAN_CPP_CACHE_MB).
class BufferPool {
 public:
  static BufferPool& get() {
    static BufferPool pool;
    return pool;
  }

  void* acquire(size_t bytes, size_t& capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(bytes);
    void* p;
    if (it != free_.end() && it->first <= 2 * bytes) {
      capacity = it->first;
      p = it->second;
      free_.erase(it);
      cached_ -= capacity;
    } else {
      capacity = (bytes + 4095) / 4096 * 4096;
      p = std::aligned_alloc(64, capacity);
      STD_TORCH_CHECK(p, "timm_san_cpp: out of memory allocating ", capacity, " bytes");
    }
    in_use_ += capacity;
    peak_ = std::max(peak_, in_use_);
    return p;
  }

  void release(void* p, size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_ -= capacity;
    if (cached_ + capacity <= limit_) {
      free_.emplace(capacity, p);
      cached_ += capacity;
    } else {
      std::free(p);
    }
  }

  // bytes in use now, their peak since the last reset, and bytes kept free for reuse
  void stats(size_t& in_use, size_t& peak, size_t& cached, bool reset_peak) {
    std::lock_guard<std::mutex> lock(mutex_);
    in_use = in_use_;
    peak = peak_;
    cached = cached_;
    if (reset_peak) peak_ = in_use_;
  }

 private:
  BufferPool() {
    const char* env = std::getenv("TIMM_SAN_CPP_CACHE_MB");
    limit_ = size_t(env ? std::max(0L, std::atol(env)) : 512) << 20;
  }
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0, limit_ = 0, in_use_ = 0, peak_ = 0;
};

// Owned buffer of uninitialised elements from the pool, with room for a vector read past its end
template <class T>
struct Buffer {
  T* data = nullptr;
  int64_t size = 0;
  size_t capacity = 0;

  Buffer() = default;
  explicit Buffer(int64_t n) : size(n) {
    data = static_cast<T*>(BufferPool::get().acquire((n + 64) * sizeof(T), capacity));
#ifdef SAN_POISON  // tests: uninitialised memory reads as NaN, so a kernel that uses it fails loudly
    std::fill(data, data + n + 64, std::numeric_limits<T>::quiet_NaN());
#endif
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : data(o.data), size(o.size), capacity(o.capacity) { o.data = nullptr; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      reset();
      data = o.data;
      size = o.size;
      capacity = o.capacity;
      o.data = nullptr;
    }
    return *this;
  }
  ~Buffer() { reset(); }

  void reset() {
    if (data) BufferPool::get().release(data, capacity);
    data = nullptr;
  }
  void zero() { std::fill(data, data + size, T(0)); }
  T* ptr() { return data; }
  const T* ptr() const { return data; }
};

// the first n elements of b, zeroed (b grown if it holds fewer)
template <class T>
T* zeroed(Buffer<T>& b, int64_t n) {
  if (b.size < n) b = Buffer<T>(n);
  std::fill(b.ptr(), b.ptr() + n, T(0));
  return b.ptr();
}

// A map (B, C, H, W) with planes contiguous (any batch stride), as the kernels read it
template <class T>
struct MapView {
  const T* data;
  int64_t batch, batch_stride, channels, height, width;
  const T* plane(int64_t b, int64_t c) const { return data + b * batch_stride + c * height * width; }
};

// reflection-padded copy (batch, C, Hp, Wp) of a map into out, planes in parallel
template <class T>
void pad_planes(const MapView<T>& x, int64_t pad, T* out) {
  SAN_PHASE(kPad);
  const int64_t batch = x.batch;
  const int64_t H = x.height, W = x.width, Hp = H + 2 * pad, Wp = W + 2 * pad, C = x.channels;
  std::vector<int64_t> cols(Wp), rows(Hp);
  for (int64_t i = 0; i < Wp; ++i) cols[i] = reflect(i, W, pad);
  for (int64_t i = 0; i < Hp; ++i) rows[i] = reflect(i, H, pad);
  torch::stable::parallel_for(0, batch * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const T* src = x.plane(plane / C, plane % C);
      T* dst = out + plane * Hp * Wp;
      for (int64_t r = 0; r < Hp; ++r) {
        const T* s = src + rows[r] * W;
        T* d = dst + r * Wp;
        if (pad < W) {
          std::memcpy(d + pad, s, W * sizeof(T));
          for (int64_t i = 0; i < pad; ++i) d[i] = s[cols[i]];
          for (int64_t i = pad + W; i < Wp; ++i) d[i] = s[cols[i]];
        } else {
          for (int64_t i = 0; i < Wp; ++i) d[i] = s[cols[i]];
        }
      }
    }
  });
}

// Gradient of reflect padding: each padded plane (Hp x Wp, of type S) summed onto the positions it was read from,
// (planes x H x W) into out (overwritten), planes in parallel
template <class S, class T>
void fold_padding(const S* padded, int64_t planes, int64_t H, int64_t W, int64_t pad, T* out) {
  SAN_PHASE(kPad);
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  std::vector<int64_t> cols(Wp), rows(Hp);
  for (int64_t i = 0; i < Wp; ++i) cols[i] = reflect(i, W, pad);
  for (int64_t i = 0; i < Hp; ++i) rows[i] = reflect(i, H, pad);
  torch::stable::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> acc(H * W);
    for (int64_t plane = begin; plane < end; ++plane) {
      std::fill(acc.begin(), acc.end(), S(0));
      const S* src = padded + plane * Hp * Wp;
      for (int64_t r = 0; r < Hp; ++r) {
        S* d = acc.data() + rows[r] * W;
        const S* s = src + r * Wp;
        if (pad < W) {
          for (int64_t i = 0; i < W; ++i) d[i] += s[pad + i];
          for (int64_t i = 0; i < pad; ++i) d[cols[i]] += s[i];
          for (int64_t i = pad + W; i < Wp; ++i) d[cols[i]] += s[i];
        } else {
          for (int64_t i = 0; i < Wp; ++i) d[cols[i]] += s[i];
        }
      }
      T* o = out + plane * H * W;
      for (int64_t i = 0; i < H * W; ++i) o[i] = T(acc[i]);
    }
  });
}

// dst row rr (row stride dst_ld) += sign * (tile row rr of the compact src) [* mul row rr (row stride mul_ld)],
// rr over the tile's rows; whole vectors, the last of a row masked, so dst must own a vector's width past each row
// (a band canvas, a tile buffer)
template <class T>
void add_tile_rows(const Tile& t, const T* src, T* dst, int64_t dst_ld, T sign, const T* mul = nullptr,
                   int64_t mul_ld = 0) {
  constexpr int L = Vec<T>::lanes;
  for (int64_t rr = 0; rr < t.rows; ++rr) {
    const T* s = src + rr * t.len;
    T* d = dst + rr * dst_ld;
    const T* m = mul ? mul + rr * mul_ld : nullptr;
    for (int64_t q = 0; q < t.len; q += L) {
      vec_t<T> v = load<T>(s + q) * sign;
      if (m) v *= load<T>(m + q);
      store<T>(d + q, load<T>(d + q) + keep_head<T>(v, t.len - q));
    }
  }
}

// the map's rows of tile t (B, channels, H, W) += a compact tile buffer (channels x lanes, stride ld), exactly
// the tile's pixels (other threads own the rest of the map)
template <class T>
void add_tile_to_map(const T* tile, int64_t ld, int64_t channels, const Tile& t, int64_t H, int64_t W, T* map) {
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t rr = 0; rr < t.rows; ++rr) {
      const T* s = tile + c * ld + rr * t.len;
      T* d = map + ((t.b * channels + c) * H + t.h0 + rr) * W + t.w0;
      for (int64_t q = 0; q < t.len; ++q) d[q] += s[q];
    }
}

// Per-thread sums (double), reduced in a fixed order after a parallel loop: results do not depend on timing
class Reduction {
 public:
  explicit Reduction(int64_t size) : size_(size) {}
  // the calling chunk's slot, keyed by the chunk's first index (at::parallel_for's chunks are fixed)
  double* slot(int64_t chunk_begin) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& s = slots_[chunk_begin];
    if (s.empty()) s.assign(size_, 0.0);
    return s.data();
  }
  std::vector<double> total() const {
    std::vector<double> out(size_, 0.0);
    for (const auto& kv : slots_)
      for (int64_t i = 0; i < size_; ++i) out[i] += kv.second[i];
    return out;
  }

 private:
  int64_t size_;
  std::mutex mutex_;
  std::map<int64_t, std::vector<double>> slots_;
};

// Gradient of a padded map (B, C, Hp, Wp) scattered band by band. A band of output rows [h0, h1) reaches padded
// rows [h0, h1 + 2 * pad); it accumulates them on its own canvas and, when done, writes the rows no other band
// reaches into the shared map and the 2 * pad rows it shares with each neighbour band into an edge buffer. The
// edges are summed after the parallel loop. Every row of the map is written exactly once per scatter.
template <class T>
class BandScatter {
 public:
  BandScatter(const Plan& plan, int64_t channels, T* out, bool add)
      : plan_(plan), channels_(channels), out_(out), add_(add),
        edge_rows_(2 * plan.pad), edges_(plan.bands.size() * 2) {}

  int64_t canvas_rows(const Band& band) const { return band.h1 - band.h0 + 2 * plan_.pad; }
  int64_t canvas_size(const Band& band) const { return channels_ * canvas_rows(band) * plan_.padded_width; }

  // write a band's canvas (channels x canvas rows x Wp) out
  void flush(int64_t band_index, const T* canvas) {
    SAN_PHASE(kScatter);
    const Band& band = plan_.bands[band_index];
    const int64_t Wp = plan_.padded_width, Hp = plan_.padded_height, rows = canvas_rows(band);
    const bool first = band.h0 == 0, last = band.h1 == plan_.height;
    const int64_t top = first ? 0 : edge_rows_, bottom = last ? rows : rows - edge_rows_;
    for (int64_t c = 0; c < channels_; ++c) {
      const T* src = canvas + c * rows * Wp;
      T* dst = out_ + ((band.b * channels_ + c) * Hp + band.h0) * Wp;
      write(dst + top * Wp, src + top * Wp, (bottom - top) * Wp);
    }
    if (!first) save_edge(band_index * 2, canvas, 0, rows);
    if (!last) save_edge(band_index * 2 + 1, canvas, rows - edge_rows_, rows);
  }

  // sum the edges of neighbouring bands into the map
  void merge() {
    const int64_t Wp = plan_.padded_width, Hp = plan_.padded_height, n = edge_rows_ * Wp;
    const int64_t count = plan_.bands.size();
    torch::stable::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const Band& band = plan_.bands[i];
        if (band.h1 == plan_.height) continue;  // its bottom edge is the next band's top: merged there
        const T* bottom = edges_[i * 2 + 1].data();
        const T* top = edges_[(i + 1) * 2].data();
        for (int64_t c = 0; c < channels_; ++c) {
          T* dst = out_ + ((band.b * channels_ + c) * Hp + band.h1) * Wp;
          const T* s1 = bottom + c * n;
          const T* s2 = top + c * n;
          if (add_) for (int64_t k = 0; k < n; ++k) dst[k] += s1[k] + s2[k];
          else for (int64_t k = 0; k < n; ++k) dst[k] = s1[k] + s2[k];
        }
      }
    });
  }

 private:
  void write(T* dst, const T* src, int64_t n) {
    if (add_) for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
    else std::memcpy(dst, src, n * sizeof(T));
  }
  void save_edge(int64_t slot, const T* canvas, int64_t row0, int64_t rows) {
    const int64_t Wp = plan_.padded_width, n = edge_rows_ * Wp;
    std::vector<T>& edge = edges_[slot];
    edge.resize(channels_ * n);
    for (int64_t c = 0; c < channels_; ++c)
      std::memcpy(edge.data() + c * n, canvas + (c * rows + row0) * Wp, n * sizeof(T));
  }

  const Plan& plan_;
  int64_t channels_;
  T* out_;
  bool add_;
  int64_t edge_rows_;
  std::vector<std::vector<T>> edges_;
};

}  // namespace san
