// SIMD vectors for the SAN kernels: GCC/Clang vector extensions, as wide as the target compiled for
// (-march=native: AVX-512, AVX2, SSE or NEON), so the same source vectorises on every CPU it is built on.
#pragma once

#include <cstdint>
#include <cstring>

namespace san {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <class T>
struct Vec {
  typedef T type __attribute__((vector_size(kVectorBytes)));
  static constexpr int lanes = kVectorBytes / sizeof(T);
};

template <class T>
struct VecInt;
template <>
struct VecInt<float> {
  typedef int32_t type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VecInt<double> {
  typedef int64_t type __attribute__((vector_size(kVectorBytes)));
};

template <class T>
using vec_t = typename Vec<T>::type;

// unaligned load and store (memcpy of a vector compiles to one move)
template <class T>
inline vec_t<T> load(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class T>
inline void store(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof v);
}

template <class T>
inline vec_t<T> splat(T s) {
  vec_t<T> v = {};
  return v + s;
}

template <class T>
inline vec_t<T> vmax(vec_t<T> a, vec_t<T> b) {
  return a > b ? a : b;
}

template <class T>
inline vec_t<T> relu(vec_t<T> a) {
  return a > splat<T>(T(0)) ? a : splat<T>(T(0));
}

// sum of a vector's lanes
template <class T>
inline T lane_sum(vec_t<T> v) {
  T s = T(0);
  for (int i = 0; i < Vec<T>::lanes; ++i) s += v[i];
  return s;
}

// v with its lanes from `count` on set to 0 (a select, so whatever those lanes held, NaN included, is dropped)
template <class T>
inline vec_t<T> keep_head(vec_t<T> v, int64_t count) {
  constexpr int L = Vec<T>::lanes;
  if (count >= L) return v;
  static const struct Iota {
    T values[L];
    Iota() {
      for (int i = 0; i < L; ++i) values[i] = T(i);
    }
  } iota;
  return load<T>(iota.values) < T(count) ? v : splat<T>(T(0));
}

// exp of x <= 0 (a softmax's arguments after the max is subtracted), within an ulp or two:
// 2^n * taylor(r) with x = n ln2 + r, |r| <= ln2 / 2; arguments below the smallest normal result give ~0.
template <class T>
inline vec_t<T> exp_nonpositive(vec_t<T> x) {
  typedef vec_t<T> vt;
  typedef typename VecInt<T>::type vi;
  constexpr bool single = sizeof(T) == 4;
  constexpr int degree = single ? 7 : 13;
  static constexpr double inv_factorial[14] = {
      1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
      1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0};
  const T lowest = single ? T(-87.0) : T(-708.0);
  x = x < splat<T>(lowest) ? splat<T>(lowest) : x;
  vt y = x * T(1.4426950408889634) + T(0.5);
  vi n = __builtin_convertvector(y, vi);
  vt nf = __builtin_convertvector(n, vt);
  n += (nf > y);  // truncation towards zero made floor: -1 where it rounded up
  nf = __builtin_convertvector(n, vt);
  // ln2 in two parts: n * ln2_hi is exact
  vt r = x - nf * T(0.693145751953125) - nf * T(1.428606820309417232e-06);
  vt p = splat<T>(T(inv_factorial[degree]));
  for (int i = degree - 1; i >= 0; --i) p = p * r + T(inv_factorial[i]);
  vi bits;
  std::memcpy(&bits, &p, sizeof p);
  bits += n << (single ? 23 : 52);
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

}  // namespace san
