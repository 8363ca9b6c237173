// Small matrix products on tiles that sit in a core's cache: C (M x N) = A (M x K) . B (K x N), N the lanes.
// A is packed once into panels of `panel` rows ([panel index][K][panel]); the micro-kernel keeps a panel x (up to
// `blocks` vectors) block of C in registers while it walks K, broadcasting A and loading B rows. Matrices of up to
// kSmallRows rows are one panel as tall as they are (even), wider ones panels of 6. Rows of C past M (the last
// panel's padding) are computed on zero weights and written too: tile buffers hold padded_rows(M) rows.
#pragma once

#include <algorithm>
#include <vector>

#include "profile.h"
#include "vec.h"

namespace san {

constexpr int kPanel = 6;
#if defined(__AVX512F__)
constexpr int kBlock = 4;      // 6 x 4 accumulators + 4 B vectors + 1 broadcast of 32 registers
constexpr int kSmallRows = 8;  // a short matrix: up to 8 x 2 accumulators
#else
constexpr int kBlock = 2;      // 6 x 2 + 2 + 1 of 16 registers
constexpr int kSmallRows = 4;
#endif

// rows of a panel for a matrix of `rows` rows, and the rows its packing and every tile buffer of it hold
inline int64_t panel_rows(int64_t rows) { return rows <= kSmallRows ? (rows + 1) / 2 * 2 : kPanel; }
inline int64_t padded_rows(int64_t rows) {
  const int64_t p = panel_rows(rows);
  return (rows + p - 1) / p * p;
}

template <class T>
inline int64_t padded_lanes(int64_t n) {
  constexpr int L = Vec<T>::lanes;
  return (n + L - 1) / L * L;
}

// A packed into panels; element (i, k) of the matrix read from a[i * row_stride + k * col_stride]
template <class T>
void pack_panels(T* out, const T* a, int64_t rows, int64_t depth, int64_t row_stride, int64_t col_stride) {
  const int64_t panel = panel_rows(rows), panels = padded_rows(rows) / panel;
  for (int64_t p = 0; p < panels; ++p) {
    T* dst = out + p * depth * panel;
    for (int64_t k = 0; k < depth; ++k)
      for (int64_t i = 0; i < panel; ++i) {
        const int64_t row = p * panel + i;
        dst[k * panel + i] = row < rows ? a[row * row_stride + k * col_stride] : T(0);
      }
  }
}

template <class T>
struct Packed {
  std::vector<T> data;
  int64_t rows = 0, depth = 0;

  Packed() = default;
  Packed(const T* a, int64_t rows_, int64_t depth_, int64_t row_stride, int64_t col_stride)
      : data(padded_rows(rows_) * depth_), rows(rows_), depth(depth_) {
    pack_panels(data.data(), a, rows, depth, row_stride, col_stride);
  }
  const T* ptr() const { return data.data(); }
};

// per-row vector padded with zeros to whole panels
template <class T>
std::vector<T> padded_vector(const T* v, int64_t rows, T fill = T(0)) {
  std::vector<T> out(padded_rows(rows), T(0));
  for (int64_t i = 0; i < rows; ++i) out[i] = v ? v[i] : fill;
  return out;
}

// What the product starts from and what is stored: C = [C +] A.B [+ bias], optionally relu(scale * C + shift)
template <class T>
struct Epilogue {
  const T* bias = nullptr;   // per row (padded), added to the product
  bool accumulate = false;   // add the product to what C holds
  const T* scale = nullptr;  // per row (padded): store relu(scale * acc + shift)
  const T* shift = nullptr;
  bool relu = false;         // store relu(acc) (ignored when scale is given: that one is always relu'd)
};

template <class T, int MB, int NB>
inline void micro_kernel(const T* a, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t depth, int64_t row0,
                         const Epilogue<T>& ep) {
  typedef vec_t<T> vt;
  constexpr int L = Vec<T>::lanes;
  vt acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NB; ++v) {
      vt init = ep.accumulate ? load<T>(c + i * ldc + v * L) : splat<T>(T(0));
      acc[i][v] = ep.bias ? init + ep.bias[row0 + i] : init;
    }
  for (int64_t k = 0; k < depth; ++k) {
    vt bv[NB];
    for (int v = 0; v < NB; ++v) bv[v] = load<T>(b + k * ldb + v * L);
    const T* ak = a + k * MB;
    for (int i = 0; i < MB; ++i) {
      const vt av = splat<T>(ak[i]);
      for (int v = 0; v < NB; ++v) acc[i][v] += av * bv[v];
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NB; ++v) {
      vt r = acc[i][v];
      if (ep.scale) r = relu<T>(r * ep.scale[row0 + i] + ep.shift[row0 + i]);
      else if (ep.relu) r = relu<T>(r);
      store<T>(c + i * ldc + v * L, r);
    }
}

template <class T, int MB, int NB>
inline void panel_product(const T* a, int64_t depth, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t n,
                          int64_t row0, const Epilogue<T>& ep) {
  constexpr int L = Vec<T>::lanes;
  for (int64_t n0 = 0; n0 < n; n0 += NB * L) {
    const int64_t blocks = std::min<int64_t>(NB, (n - n0) / L);
    if (blocks == NB) micro_kernel<T, MB, NB>(a, b + n0, ldb, c + n0, ldc, depth, row0, ep);
    else if (NB > 2 && blocks == 3) micro_kernel<T, MB, (NB > 2 ? 3 : 1)>(a, b + n0, ldb, c + n0, ldc, depth, row0, ep);
    else if (NB > 1 && blocks == 2) micro_kernel<T, MB, (NB > 1 ? 2 : 1)>(a, b + n0, ldb, c + n0, ldc, depth, row0, ep);
    else micro_kernel<T, MB, 1>(a, b + n0, ldb, c + n0, ldc, depth, row0, ep);
  }
}

// C (prows x n) from prows packed rows (whole panels of `panel` rows) and B (depth x n, row stride ldb); n a multiple
// of the vector lanes; the epilogue's per-row vectors start at the first of these rows
template <class T>
void gemm_rows(const T* a_packed, int64_t prows, int64_t panel, int64_t depth, const T* b, int64_t ldb, T* c,
               int64_t ldc, int64_t n, const Epilogue<T>& ep) {
  SAN_PHASE(kProduct);
  for (int64_t r0 = 0; r0 < prows; r0 += panel) {
    const T* a = a_packed + r0 * depth;
    T* cc = c + r0 * ldc;
    switch (panel) {
      case 2: panel_product<T, 2, 2>(a, depth, b, ldb, cc, ldc, n, r0, ep); break;
      case 4: panel_product<T, 4, 2>(a, depth, b, ldb, cc, ldc, n, r0, ep); break;
#if defined(__AVX512F__)
      case 8: panel_product<T, 8, 2>(a, depth, b, ldb, cc, ldc, n, r0, ep); break;
#endif
      default: panel_product<T, kPanel, kBlock>(a, depth, b, ldb, cc, ldc, n, r0, ep); break;
    }
  }
}

// C (padded rows x n) from packed A (rows x depth) and B (depth x n, row stride ldb)
template <class T>
void gemm(const T* a_packed, int64_t rows, int64_t depth, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t n,
          const Epilogue<T>& ep) {
  gemm_rows<T>(a_packed, padded_rows(rows), panel_rows(rows), depth, b, ldb, c, ldc, n, ep);
}

template <class T>
inline void gemm(const Packed<T>& a, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t n, const Epilogue<T>& ep) {
  gemm<T>(a.ptr(), a.rows, a.depth, b, ldb, c, ldc, n, ep);
}

// out (cols x ldo) = transpose of in (rows x cols, row stride ldi), for the weight gradients' products
template <class T>
void transpose(const T* in, int64_t rows, int64_t cols, int64_t ldi, T* out, int64_t ldo) {
  constexpr int64_t block = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += block)
    for (int64_t c0 = 0; c0 < cols; c0 += block)
      for (int64_t c = c0; c < std::min(cols, c0 + block); ++c)
        for (int64_t r = r0; r < std::min(rows, r0 + block); ++r) out[c * ldo + r] = in[r * ldi + c];
}

}  // namespace san
