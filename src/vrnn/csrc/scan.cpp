// The loops of vrnn's fused scans (fast.py: the VRNN's encoder -> z -> phi_z -> cell chain;
// fast_srnn.py: the SRNN's z-chain; fast_dkf.py: the DKF's combiner chain), forward and
// hand-written backward through time, compiled. What the loops compute is
// written out in Python in fast.py (FusedScan._forward / _backward, the reference this file
// is tested against); here the same steps run without a Python call per op: matmuls as
// ATen calls into preallocated buffers, every elementwise stage of a step (ReLU, the
// reparameterised sample, the LSTM's or GRU's gate arithmetic, masks, resampling gathers)
// as one plain loop over the step's rows. The weight gradients (one matmul over T*R rows
// per weight) stay in Python.
//
// Layout: everything time-major and contiguous, (T, rows, features). ax/gx have Bs rows
// (one per sequence), the state R = k*Bs rows (k samples, sample-major: row r reads
// ax/gx row r % Bs). keep: (T, R) of 1/0 in the scalar type, or undefined. Ancestors:
// anc (n, R) int64 with pos[t] = its row for step t, or -1 where step t does not resample.
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

using at::Tensor;

namespace {

// exp and tanh: float32 with Cephes' polynomials (expf, tanhf: within 2 ulp of the
// correctly rounded value), written branch-free so that the compiler vectorises the loops
// that call them (the C library's expf/tanhf are scalar calls, and they were most of a
// step's time at small widths); float64 (tests, gradcheck) with the C library's.
template <typename T> inline T fexp(T x) { return std::exp(x); }
template <typename T> inline T ftanh(T x) { return std::tanh(x); }

template <> inline float fexp<float>(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  float fx = x * 1.44269504088896341f;
  fx += std::copysign(0.5f, fx);
  const int n = static_cast<int>(fx);  // round half away from zero
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.f;
  int bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

template <> inline float ftanh<float>(float x) {
  const float a = std::fabs(x);
  const float z = x * x;  // |x| < 0.625: an odd polynomial
  const float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                        1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
  const float big = 1.f - 2.f / (fexp(2.f * a) + 1.f);
  const float sbig = std::copysign(big, x);
  const float m = static_cast<float>(a < 0.625f);  // a blend, not a branch: vectorises
  return m * small + (1.f - m) * sbig;
}

// log for x > 0 (normal), Cephes' logf polynomial (within 2 ulp), branch-free
inline float flog(float x) {
  int bits;
  std::memcpy(&bits, &x, sizeof bits);
  int e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x807fffff) | 0x3f000000;  // the mantissa, in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof m);
  const int lo = m < 0.707106781186547524f;
  e -= lo;
  m = m + m * static_cast<float>(lo) - 1.f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  y = y * m * z + fe * -2.12194440e-4f - 0.5f * z;
  return (m + y) + fe * 0.693359375f;
}

template <typename T> inline T sigm(T x) { return T(1) / (T(1) + fexp(-x)); }
// softplus(x) = log1p(exp(x)) (x below ATen's threshold 20, else x)
template <typename T> inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }
template <> inline float softplus<float>(float x) {
  // max(x, 0) + log1p(exp(-|x|)), with log1p(y) = log(u) * y / (u - 1), u = 1 + y (exact
  // to rounding for small y too; y in (0, 1], so u - 1 > 0 unless y underflows in u)
  const float y = fexp(-std::fabs(x));
  const float u = 1.f + y;
  const float d = u - 1.f;
  const float small = static_cast<float>(d == 0.f);
  const float l1p = small * y + (1.f - small) * (flog(u) * (y / (d + small)));
  const float pos = x > 0.f ? x : 0.f;
  return x > 20.f ? x : pos + l1p;
}

// y = sigmoid(x), y = tanh(x) over n contiguous values (vectorised for float)
template <typename T> void vsigm(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = sigm(x[i]);
}
template <typename T> void vtanh(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = ftanh(x[i]);
}

template <typename T> inline T* ptr(const Tensor& t) { return t.data_ptr<T>(); }

#ifdef VRNN_BLAS  // the BLAS that libtorch_cpu carries (MKL on x86-64 wheels); else ATen's mm
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
}
inline void blas(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                 const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                 const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                 const double* a, const int* lda, const double* b, const int* ldb, const double* beta,
                 double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
#endif

// C (rows x n, row stride ldc) = beta * C + A (rows x k, row stride lda) . op(W), where
// op(W) = W^T for a row-major W of (n x k) (wt: a Linear's weight), W for one of (k x n).
// One call into BLAS, no tensor made: at the sizes of a step (16 rows), ATen's per-call
// work (checks, output views, the bias's broadcast copy) costs as much as the arithmetic.
template <typename T>
void gemm(int64_t rows, int64_t n, int64_t k, const T* A, int64_t lda, const T* W, bool wt, T beta, T* C,
          int64_t ldc) {
  if (rows == 0 || n == 0) return;
#ifdef VRNN_BLAS
  // column-major: C^T (n x rows) = op(W)^T (n x k) . A^T (k x rows)
  const char ta = wt ? 'T' : 'N', tb = 'N';
  const int m_ = n, n_ = rows, k_ = k, lw = wt ? k : n, la = lda, lc = ldc;
  const T one = 1;
  blas(&ta, &tb, &m_, &n_, &k_, &one, W, &lw, A, &la, &beta, C, &lc);
#else
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor a = at::from_blob(const_cast<T*>(A), {rows, k}, {lda, 1}, opts);
  Tensor w = wt ? at::from_blob(const_cast<T*>(W), {n, k}, opts).t() : at::from_blob(const_cast<T*>(W), {k, n}, opts);
  Tensor c = at::from_blob(C, {rows, n}, {ldc, 1}, opts);
  if (beta == T(0)) at::mm_out(c, a, w);
  else c.addmm_(a, w);
#endif
}

// C (rows x n, row stride ldc) <- each row the vector b (n), or the rows of B (rows x n)
template <typename T> void fill_rows(T* C, int64_t ldc, const T* b, int64_t rows, int64_t n, bool per_row) {
  for (int64_t r = 0; r < rows; ++r) std::copy(b + (per_row ? r * n : 0), b + (per_row ? r * n : 0) + n, C + r * ldc);
}

// x (rows, n) <- min(relu(x), hi), in place (hi = inf, the default: relu)
template <typename T>
void relu_(T* __restrict__ x, int64_t n, T hi = std::numeric_limits<T>::infinity()) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] > T(0) ? (x[i] < hi ? x[i] : hi) : T(0);
}

// d (rows, n) <- g * (0 < y < hi), y that ReLU's output; d may have a row stride (ld)
template <typename T>
void relu_back(T* d, int64_t ld, const T* g, const T* y, int64_t rows, int64_t n,
               T hi = std::numeric_limits<T>::infinity()) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const T v = y[r * n + j];
      d[r * ld + j] = v > T(0) && v < hi ? g[r * n + j] : T(0);
    }
}

// the state after a resampling step: row r of x (R x n) <- row a[r] of src; without
// ancestors (a null) src copied as it is
template <typename T> void gather_rows(T* x, const T* src, const int64_t* a, int64_t R, int64_t n) {
  if (!a) {
    std::copy(src, src + R * n, x);
    return;
  }
  for (int64_t r = 0; r < R; ++r) std::copy(src + a[r] * n, src + (a[r] + 1) * n, x + r * n);
}

// its reverse: the gradient d (R x n) of the gathered rows added back to the rows they came
// from (a), through the buffer tmp (R x n)
template <typename T> void scatter_back(T* d, T* tmp, const int64_t* a, int64_t R, int64_t n) {
  std::fill(tmp, tmp + R * n, T(0));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < n; ++j) tmp[a[r] * n + j] += d[r * n + j];
  std::copy(tmp, tmp + R * n, d);
}

struct Weights {
  Tensor w_cat, b_cat;             // (E+G, H), (E+G) or undefined (LSTM)
  std::vector<Tensor> body_w, body_b, phiz_w, phiz_b;
  Tensor w_g, b_g, w_z;
};

template <typename T>
std::vector<Tensor> forward_impl(const Tensor& ax, const Tensor& gx, const Tensor& eps,
                                 const Tensor& keep, const Tensor& anc,
                                 const std::vector<int64_t>& pos, const Tensor& h0,
                                 const Tensor& c0, const Weights& W, bool lstm, double floor_) {
  const int64_t Tn = ax.size(0), Bs = ax.size(1), E = ax.size(2), G = gx.size(2);
  const int64_t R = h0.size(0), H = h0.size(1), Z = eps.size(2);
  const int64_t nb = W.body_w.size(), np = W.phiz_w.size();
  const T floor = static_cast<T>(floor_);
  auto opts = ax.options();
  Tensor HS = at::empty({Tn + 1, R, H}, opts), CS = at::empty({Tn + 1, R, H}, opts);
  HS[0].copy_(h0);
  CS[0].copy_(c0);
  std::vector<Tensor> U, Q;
  U.push_back(at::empty({Tn, R, E}, opts));
  for (int64_t k = 0; k < nb; ++k) U.push_back(at::empty({Tn, R, W.body_w[k].size(0)}, opts));
  for (int64_t k = 0; k < np; ++k) Q.push_back(at::empty({Tn, R, W.phiz_w[k].size(0)}, opts));
  Tensor MU = at::empty({Tn, R, Z}, opts), PRE = at::empty({Tn, R, Z}, opts);
  Tensor STD = at::empty({Tn, R, Z}, opts), ZS = at::empty({Tn, R, Z}, opts);
  const int64_t na = lstm ? 5 : 4;
  Tensor ACT = at::empty({Tn, R, na * H}, opts);
  // scratch
  Tensor EG = at::empty({R, E + G}, opts), O = at::empty({R, 2 * Z}, opts), GI = at::empty({R, G}, opts);
  Tensor HN = at::empty({R, H}, opts), CN = at::empty({R, H}, opts), PG = at::empty({R, G}, opts);
  T* hs = ptr<T>(HS);
  T* cs = ptr<T>(CS);
  const T* axp = ptr<T>(ax);
  const T* gxp = ptr<T>(gx);
  const T* epsp = ptr<T>(eps);
  const T* kp = keep.defined() ? ptr<T>(keep) : nullptr;
  const int64_t* ap = anc.defined() ? anc.data_ptr<int64_t>() : nullptr;
  T* eg = ptr<T>(EG);
  T* o = ptr<T>(O);
  T* gi = ptr<T>(GI);
  T* pg = ptr<T>(PG);
  for (int64_t t = 0; t < Tn; ++t) {
    const T* hp = hs + t * R * H;
    const T* cp = cs + t * R * H;
    if (W.b_cat.defined()) fill_rows(eg, E + G, ptr<T>(W.b_cat), R, E + G, false);
    gemm<T>(R, E + G, H, hp, H, ptr<T>(W.w_cat), true, W.b_cat.defined() ? T(1) : T(0), eg, E + G);
    // encoder's first layer: relu(ax_t + e_h)
    {
      T* u = ptr<T>(U[0]) + t * R * E;
      const T* a = axp + t * Bs * E;
      for (int64_t r = 0; r < R; ++r) {
        const T* ar = a + (r % Bs) * E;
        for (int64_t j = 0; j < E; ++j) {
          T v = ar[j] + eg[r * (E + G) + j];
          u[r * E + j] = v > T(0) ? v : T(0);
        }
      }
    }
    for (int64_t k = 0; k < nb; ++k) {
      const int64_t n = U[k + 1].size(2), m = U[k].size(2);
      T* out = ptr<T>(U[k + 1]) + t * R * n;
      fill_rows(out, n, ptr<T>(W.body_b[k]), R, n, false);
      gemm<T>(R, n, m, ptr<T>(U[k]) + t * R * m, m, ptr<T>(W.body_w[k]), true, T(1), out, n);
      relu_(out, R * n);
    }
    {
      const int64_t m = U[nb].size(2);
      fill_rows(o, 2 * Z, ptr<T>(W.b_g), R, 2 * Z, false);
      gemm<T>(R, 2 * Z, m, ptr<T>(U[nb]) + t * R * m, m, ptr<T>(W.w_g), true, T(1), o, 2 * Z);
    }
    {  // mu, std = softplus(pre) + floor, z = mu + std * eps
      T* mu = ptr<T>(MU) + t * R * Z;
      T* pre = ptr<T>(PRE) + t * R * Z;
      T* sd = ptr<T>(STD) + t * R * Z;
      T* z = ptr<T>(ZS) + t * R * Z;
      const T* e = epsp + t * R * Z;
      for (int64_t r = 0; r < R; ++r) {
        const T* __restrict__ om = o + r * 2 * Z;
        const T* __restrict__ op = o + r * 2 * Z + Z;
        const T* __restrict__ er = e + r * Z;
        T* __restrict__ mr = mu + r * Z;
        T* __restrict__ pr = pre + r * Z;
        T* __restrict__ sr = sd + r * Z;
        T* __restrict__ zr = z + r * Z;
        for (int64_t j = 0; j < Z; ++j) {
          const T s = softplus(op[j]) + floor;
          mr[j] = om[j];
          pr[j] = op[j];
          sr[j] = s;
          zr[j] = om[j] + s * er[j];
        }
      }
    }
    const T* q = ptr<T>(ZS) + t * R * Z;
    int64_t qn = Z;
    for (int64_t k = 0; k < np; ++k) {
      const int64_t n = Q[k].size(2);
      T* out = ptr<T>(Q[k]) + t * R * n;
      fill_rows(out, n, ptr<T>(W.phiz_b[k]), R, n, false);
      gemm<T>(R, n, qn, q, qn, ptr<T>(W.phiz_w[k]), true, T(1), out, n);
      relu_(out, R * n);
      q = out;
      qn = n;
    }
    gemm<T>(R, G, qn, q, qn, ptr<T>(W.w_z), true, T(0), gi, G);
    // the cell: pre-activations (R, G) into PG, activations, then the state
    const bool gather = ap && pos[t] >= 0;
    T* hn = gather ? ptr<T>(HN) : hs + (t + 1) * R * H;
    T* cn = gather ? ptr<T>(CN) : cs + (t + 1) * R * H;
    const T* g = gxp + t * Bs * G;
    T* act = ptr<T>(ACT) + t * R * na * H;
    for (int64_t r = 0; r < R; ++r) {
      const T* __restrict__ gr = g + (r % Bs) * G;
      const T* __restrict__ gir = gi + r * G;
      const T* __restrict__ ghr = eg + r * (E + G) + E;
      T* __restrict__ p = pg + r * G;
      T* __restrict__ ar = act + r * na * H;
      const bool kept = !kp || kp[t * R + r] != T(0);
      const int64_t i0 = r * H;
      if (lstm) {  // [i, f, g, o] -> acts [si, sf, tg, so, tc]
        for (int64_t j = 0; j < G; ++j) p[j] = (gr[j] + gir[j]) + ghr[j];
        vsigm(p, ar, 2 * H);
        vtanh(p + 2 * H, ar + 2 * H, H);
        vsigm(p + 3 * H, ar + 3 * H, H);
        const T* __restrict__ si = ar;
        const T* __restrict__ sf = ar + H;
        const T* __restrict__ tg = ar + 2 * H;
        T* __restrict__ cv = cn + i0;
        for (int64_t j = 0; j < H; ++j) cv[j] = sf[j] * cp[i0 + j] + si[j] * tg[j];
        vtanh(cv, ar + 4 * H, H);
        const T* __restrict__ so = ar + 3 * H;
        const T* __restrict__ tc = ar + 4 * H;
        T* __restrict__ hv = hn + i0;
        for (int64_t j = 0; j < H; ++j) hv[j] = so[j] * tc[j];
      } else {  // [r, u, n] -> acts [r, u, n, w_hn h + b_hn]
        for (int64_t j = 0; j < 2 * H; ++j) p[j] = (gr[j] + gir[j]) + ghr[j];
        vsigm(p, ar, 2 * H);
        const T* __restrict__ rr = ar;
        const T* __restrict__ uu = ar + H;
        T* __restrict__ hh = ar + 3 * H;
        for (int64_t j = 0; j < H; ++j) {
          hh[j] = ghr[2 * H + j];
          p[2 * H + j] = (gr[2 * H + j] + gir[2 * H + j]) + rr[j] * ghr[2 * H + j];
        }
        vtanh(p + 2 * H, ar + 2 * H, H);
        const T* __restrict__ n = ar + 2 * H;
        T* __restrict__ hv = hn + i0;
        T* __restrict__ cv = cn + i0;
        for (int64_t j = 0; j < H; ++j) {
          hv[j] = (T(1) - uu[j]) * n[j] + uu[j] * hp[i0 + j];
          cv[j] = cp[i0 + j];
        }
      }
      if (!kept) {
        std::copy(hp + i0, hp + i0 + H, hn + i0);
        std::copy(cp + i0, cp + i0 + H, cn + i0);
      }
    }
    if (gather) {  // each row continues from its ancestor
      const int64_t* a = ap + pos[t] * R;
      T* hd = hs + (t + 1) * R * H;
      T* cd = cs + (t + 1) * R * H;
      for (int64_t r = 0; r < R; ++r) {
        std::copy(hn + a[r] * H, hn + (a[r] + 1) * H, hd + r * H);
        std::copy(cn + a[r] * H, cn + (a[r] + 1) * H, cd + r * H);
      }
    }
  }
  std::vector<Tensor> out{HS, CS, MU, PRE, STD, ZS, ACT};
  out.insert(out.end(), U.begin(), U.end());
  out.insert(out.end(), Q.begin(), Q.end());
  return out;
}

template <typename T>
std::vector<Tensor> backward_impl(const Tensor& HS, const Tensor& CS, const std::vector<Tensor>& U,
                                  const std::vector<Tensor>& Q, const Tensor& PRE, const Tensor& ACT,
                                  const Tensor& eps, const Tensor& keep, const Tensor& anc,
                                  const std::vector<int64_t>& pos, const Tensor& gHp, const Tensor& gMu,
                                  const Tensor& gStd, const Tensor& gZ, const Tensor& gFz,
                                  const Tensor& gh, const Tensor& gc, const Weights& W, bool lstm) {
  const int64_t Tn = HS.size(0) - 1, R = HS.size(1), H = HS.size(2), Z = eps.size(2);
  const int64_t E = U[0].size(2), G = W.w_z.size(0);
  const int64_t nb = W.body_w.size(), np = W.phiz_w.size();
  const int64_t na = lstm ? 5 : 4;
  auto opts = HS.options();
  Tensor DEG = at::empty({Tn, R, E + G}, opts);
  Tensor DGI = lstm ? DEG.narrow(2, E, G) : at::empty({Tn, R, G}, opts);
  std::vector<Tensor> DA{DEG.narrow(2, 0, E)};
  for (int64_t k = 0; k < nb; ++k) DA.push_back(at::empty({Tn, R, U[k + 1].size(2)}, opts));
  Tensor DO = at::empty({Tn, R, 2 * Z}, opts), DZ = at::empty({Tn, R, Z}, opts);
  std::vector<Tensor> DP;
  for (int64_t k = 0; k < np; ++k) DP.push_back(at::empty({Tn, R, Q[k].size(2)}, opts));
  Tensor dh = gh.clone(), dc = gc.clone();
  Tensor DHN = at::empty({R, H}, opts), CH = at::empty({R, H}, opts), TMP = at::empty({R, H}, opts);
  std::vector<Tensor> DQ;  // scratch: gradient of each phi_z layer's output, then of each encoder layer's
  for (int64_t k = 0; k < np; ++k) DQ.push_back(at::empty({R, Q[k].size(2)}, opts));
  std::vector<Tensor> DU;
  for (int64_t k = 0; k <= nb; ++k) DU.push_back(at::empty({R, U[k].size(2)}, opts));
  const T* kp = keep.defined() ? ptr<T>(keep) : nullptr;
  const int64_t* ap = anc.defined() ? anc.data_ptr<int64_t>() : nullptr;
  T* dhp = ptr<T>(dh);
  T* dcp = ptr<T>(dc);
  T* dhn = ptr<T>(DHN);
  T* ch = ptr<T>(CH);
  T* tmp = ptr<T>(TMP);
  const T* hsp = ptr<T>(HS);
  const T* csp = ptr<T>(CS);
  for (int64_t t = Tn - 1; t >= 0; --t) {
    if (ap && pos[t] >= 0)  // the state after step t was gathered: scatter its gradient back
      for (T* d : {dhp, dcp}) scatter_back(d, tmp, ap + pos[t] * R, R, H);
    const T* act = ptr<T>(ACT) + t * R * na * H;
    const T* hprev = hsp + t * R * H;
    const T* cprev = csp + t * R * H;
    T* deg = ptr<T>(DEG) + t * R * (E + G);
    const int64_t ld = E + G;
    T* dgi = lstm ? deg + E : ptr<T>(DGI) + t * R * G;
    const int64_t ldg = lstm ? ld : G;
    for (int64_t r = 0; r < R; ++r) {  // masks: the state's gradient passes kept rows' steps
      const T k = kp ? kp[t * R + r] : T(1), nk = T(1) - k;
      const T* __restrict__ ar = act + r * na * H;
      T* __restrict__ dhr = dhp + r * H;
      T* __restrict__ dcr = dcp + r * H;
      T* __restrict__ dn_ = dhn + r * H;
      T* __restrict__ chr = ch + r * H;
      T* __restrict__ d = dgi + r * ldg;
      for (int64_t j = 0; j < H; ++j) {
        dn_[j] = dhr[j] * k;
        chr[j] = dhr[j] * nk;
      }
      if (lstm) {
        const T* __restrict__ cpr = cprev + r * H;
        for (int64_t j = 0; j < H; ++j) {
          const T si = ar[j], sf = ar[H + j], tg = ar[2 * H + j], so = ar[3 * H + j], tc = ar[4 * H + j];
          const T dh_ = dn_[j];
          const T dct = dcr[j] * k + (dh_ * so) * (T(1) - tc * tc);
          d[j] = (dct * tg) * (si - si * si);
          d[H + j] = (dct * cpr[j]) * (sf - sf * sf);
          d[2 * H + j] = (dct * si) * (T(1) - tg * tg);
          d[3 * H + j] = (dh_ * tc) * (so - so * so);
          dcr[j] = dct * sf + dcr[j] * nk;
        }
      } else {
        const T* __restrict__ hpr = hprev + r * H;
        T* __restrict__ e = deg + r * ld + E;
        for (int64_t j = 0; j < H; ++j) {
          const T rr = ar[j], u = ar[H + j], n = ar[2 * H + j], hh = ar[3 * H + j];
          const T dh_ = dn_[j];
          const T dnp = (dh_ - dh_ * u) * (T(1) - n * n);
          const T dr = (dnp * hh) * (rr - rr * rr), du = (dh_ * (hpr[j] - n)) * (u - u * u);
          d[2 * H + j] = dnp;
          d[j] = dr;
          d[H + j] = du;
          e[j] = dr;
          e[H + j] = du;
          e[2 * H + j] = dnp * rr;
        }
      }
    }
    // phi_z (np >= 0 layers: none in the RVAE's chain, whose cell reads z), then z = mu + std * eps
    if (np == 0) {
      T* dz = ptr<T>(DZ) + t * R * Z;
      fill_rows(dz, Z, ptr<T>(gZ) + t * R * Z, R, Z, true);
      gemm<T>(R, Z, G, dgi, ldg, ptr<T>(W.w_z), false, T(1), dz, Z);
    } else {
      const int64_t F = Q[np - 1].size(2);
      T* dq = ptr<T>(DQ[np - 1]);
      fill_rows(dq, F, ptr<T>(gFz) + t * R * F, R, F, true);
      gemm<T>(R, F, G, dgi, ldg, ptr<T>(W.w_z), false, T(1), dq, F);
    }
    for (int64_t k = np - 1; k >= 0; --k) {
      const int64_t n = Q[k].size(2);
      T* dp = ptr<T>(DP[k]) + t * R * n;
      relu_back(dp, n, ptr<T>(DQ[k]), ptr<T>(Q[k]) + t * R * n, R, n);
      if (k == 0) {
        T* dz = ptr<T>(DZ) + t * R * Z;
        fill_rows(dz, Z, ptr<T>(gZ) + t * R * Z, R, Z, true);
        gemm<T>(R, Z, n, dp, n, ptr<T>(W.phiz_w[0]), false, T(1), dz, Z);
      } else {
        const int64_t m = Q[k - 1].size(2);
        gemm<T>(R, m, n, dp, n, ptr<T>(W.phiz_w[k]), false, T(0), ptr<T>(DQ[k - 1]), m);
      }
    }
    {
      const T* dz = ptr<T>(DZ) + t * R * Z;
      const T* gmu = ptr<T>(gMu) + t * R * Z;
      const T* gsd = ptr<T>(gStd) + t * R * Z;
      const T* e = ptr<T>(eps) + t * R * Z;
      const T* pre = ptr<T>(PRE) + t * R * Z;
      T* d = ptr<T>(DO) + t * R * 2 * Z;
      for (int64_t r = 0; r < R; ++r) {
        T* __restrict__ dm = d + r * 2 * Z;
        T* __restrict__ dp = d + r * 2 * Z + Z;
        const T* __restrict__ dzr = dz + r * Z;
        const T* __restrict__ gm = gmu + r * Z;
        const T* __restrict__ gs = gsd + r * Z;
        const T* __restrict__ er = e + r * Z;
        const T* __restrict__ pr = pre + r * Z;
        for (int64_t j = 0; j < Z; ++j) {
          dm[j] = dzr[j] + gm[j];
          dp[j] = (gs[j] + dzr[j] * er[j]) * sigm(pr[j]);
        }
      }
    }
    // encoder, top down to its first layer's pre-activation
    gemm<T>(R, U[nb].size(2), 2 * Z, ptr<T>(DO) + t * R * 2 * Z, 2 * Z, ptr<T>(W.w_g), false, T(0),
            ptr<T>(DU[nb]), U[nb].size(2));
    for (int64_t k = nb - 1; k >= 0; --k) {
      const int64_t n = U[k + 1].size(2), m = U[k].size(2);
      T* da = ptr<T>(DA[k + 1]) + t * R * n;
      relu_back(da, n, ptr<T>(DU[k + 1]), ptr<T>(U[k + 1]) + t * R * n, R, n);
      gemm<T>(R, m, n, da, n, ptr<T>(W.body_w[k]), false, T(0), ptr<T>(DU[k]), m);
    }
    relu_back(deg, ld, ptr<T>(DU[0]), ptr<T>(U[0]) + t * R * E, R, E);
    // back into h_{t-1}: the encoder's first layer and w_h together, plus h_prev's gradient
    fill_rows(dhp, H, ptr<T>(gHp) + t * R * H, R, H, true);
    gemm<T>(R, H, E + G, deg, ld, ptr<T>(W.w_cat), false, T(1), dhp, H);
    if (!lstm || kp) {
      const T* ar0 = ptr<T>(ACT) + t * R * na * H;
      for (int64_t r = 0; r < R; ++r) {
        T* __restrict__ dhr = dhp + r * H;
        const T* __restrict__ u = ar0 + r * na * H + H;
        const T* __restrict__ dn_ = dhn + r * H;
        const T* __restrict__ chr = ch + r * H;
        if (!lstm)
          for (int64_t j = 0; j < H; ++j) dhr[j] += dn_[j] * u[j];  // the u * h_{t-1} path
        if (kp)
          for (int64_t j = 0; j < H; ++j) dhr[j] += chr[j];
      }
    }
  }
  std::vector<Tensor> out{DEG, DGI, DO, DZ, dh, dc};
  out.insert(out.end(), DA.begin(), DA.end());
  out.insert(out.end(), DP.begin(), DP.end());
  return out;
}

Weights weights(Tensor w_cat, c10::optional<Tensor> b_cat, std::vector<Tensor> body_w,
                std::vector<Tensor> body_b, Tensor w_g, Tensor b_g, std::vector<Tensor> phiz_w,
                std::vector<Tensor> phiz_b, Tensor w_z) {
  Weights W;
  auto c = [](std::vector<Tensor> ts) {
    for (auto& t : ts) t = t.contiguous();
    return ts;
  };
  W.w_cat = w_cat.contiguous();
  if (b_cat) W.b_cat = b_cat->contiguous();
  W.body_w = c(body_w); W.body_b = c(body_b); W.phiz_w = c(phiz_w); W.phiz_b = c(phiz_b);
  W.w_g = w_g.contiguous(); W.w_z = w_z.contiguous();
  if (b_g.defined()) W.b_g = b_g.contiguous();
  return W;
}

// every ancestor row in [0, rows) (the loops index with them unchecked)
void check_ancestors(const Tensor& anc, const std::vector<int64_t>& pos, int64_t R) {
  if (!anc.defined()) return;
  TORCH_CHECK(anc.dim() == 2 && anc.size(1) == R && anc.scalar_type() == at::kLong,
              "vrnn scan: ancestors must be int64 (steps, rows)");
  for (int64_t p : pos) TORCH_CHECK(p < anc.size(0), "vrnn scan: ancestor position out of range");
  if (anc.numel()) {
    TORCH_CHECK(anc.min().item<int64_t>() >= 0 && anc.max().item<int64_t>() < R,
                "vrnn scan: ancestor index out of range [0, ", R, ")");
  }
}

void check(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(!t.defined() || (t.is_contiguous() && t.device().is_cpu()), name, ": contiguous CPU tensor expected");
  TORCH_CHECK(!t.defined() || t.scalar_type() == like.scalar_type() || t.scalar_type() == at::kLong,
              name, ": dtype mismatch");
}

std::vector<Tensor> scan_forward(Tensor ax, Tensor gx, Tensor eps, c10::optional<Tensor> keep,
                                 c10::optional<Tensor> anc, std::vector<int64_t> pos, Tensor h0, Tensor c0,
                                 Tensor w_cat, c10::optional<Tensor> b_cat, std::vector<Tensor> body_w,
                                 std::vector<Tensor> body_b, Tensor w_g, Tensor b_g,
                                 std::vector<Tensor> phiz_w, std::vector<Tensor> phiz_b, Tensor w_z,
                                 bool lstm, double floor_) {
  Tensor k = keep ? *keep : Tensor(), a = anc ? *anc : Tensor();
  for (auto* t : {&ax, &gx, &eps, &k, &a, &h0, &c0}) check(*t, ax, "vrnn scan input");
  TORCH_CHECK(int64_t(pos.size()) == ax.size(0), "vrnn scan: one ancestor position per step expected");
  const int64_t T = ax.size(0), Bs = ax.size(1), E = ax.size(2), R = h0.size(0), H = h0.size(1);
  const int64_t G = gx.size(2), Z = eps.size(2);
  TORCH_CHECK(ax.dim() == 3 && gx.dim() == 3 && eps.dim() == 3 && h0.dim() == 2, "vrnn scan: ranks");
  TORCH_CHECK(gx.size(0) == T && gx.size(1) == Bs && eps.size(0) == T && eps.size(1) == R && Bs > 0 &&
              R % Bs == 0 && c0.sizes() == h0.sizes(), "vrnn scan: inconsistent shapes");
  TORCH_CHECK(!k.defined() || (k.size(0) == T && k.size(1) == R), "vrnn scan: keep must be (T, rows)");
  TORCH_CHECK(w_cat.size(0) == E + G && w_cat.size(1) == H && w_z.size(0) == G && w_g.size(0) == 2 * Z &&
              (phiz_w.empty() ? w_z.size(1) == Z : phiz_w[0].size(1) == Z) && body_w.size() == body_b.size() &&
              phiz_w.size() == phiz_b.size(), "vrnn scan: weight shapes");
  check_ancestors(a, pos, R);
  auto W = weights(w_cat, b_cat, body_w, body_b, w_g, b_g, phiz_w, phiz_b, w_z);
  at::NoGradGuard ng;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(ax.scalar_type(), "vrnn_scan_forward", [&] {
    out = forward_impl<scalar_t>(ax, gx, eps, k, a, pos, h0, c0, W, lstm, floor_);
  });
  return out;
}

std::vector<Tensor> scan_backward(Tensor HS, Tensor CS, std::vector<Tensor> U, std::vector<Tensor> Q,
                                  Tensor PRE, Tensor ACT, Tensor eps, c10::optional<Tensor> keep,
                                  c10::optional<Tensor> anc, std::vector<int64_t> pos, Tensor gHp,
                                  Tensor gMu, Tensor gStd, Tensor gZ, Tensor gFz, Tensor gh, Tensor gc,
                                  Tensor w_cat, std::vector<Tensor> body_w, Tensor w_g,
                                  std::vector<Tensor> phiz_w, Tensor w_z, bool lstm) {
  Tensor k = keep ? *keep : Tensor(), a = anc ? *anc : Tensor();
  for (auto* t : {&HS, &CS, &PRE, &ACT, &eps, &k, &a, &gHp, &gMu, &gStd, &gZ, &gFz, &gh, &gc})
    check(*t, HS, "vrnn scan backward input");
  Weights W = weights(w_cat, c10::nullopt, body_w, {}, w_g, Tensor(), phiz_w, {}, w_z);
  at::NoGradGuard ng;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(HS.scalar_type(), "vrnn_scan_backward", [&] {
    out = backward_impl<scalar_t>(HS, CS, U, Q, PRE, ACT, eps, k, a, pos, gHp, gMu, gStd, gZ, gFz, gh, gc,
                                  W, lstm);
  });
  return out;
}

// ------------------------------------------------------------------ the SRNN's z-chain
// fast_srnn.py's ZChain: per step u = relu(pq_t + W_z z_{t-1}) (clipped at hi) through the block-diagonal
// body, o = [mu_p, dmu, pre_p, pre_q] = W_out u + b_out, [std_p, std_q] = softplus + floor,
// z_t = mu_q + std_q * eps_t (mu_q = mu_p + dmu with the residual posterior), carried where
// keep, gathered by the ancestors. pq (T, Bs, W) is shared by the k samples of a sequence.
template <typename T>
std::vector<Tensor> chain_forward_impl(const Tensor& pq, const Tensor& eps, const Tensor& keep, const Tensor& anc,
                                       const std::vector<int64_t>& pos, const Tensor& z0, const Tensor& w_z,
                                       const std::vector<Tensor>& body_w, const std::vector<Tensor>& body_b,
                                       const Tensor& w_out, const Tensor& b_out, bool residual, double floor_,
                                       double clip) {
  const int64_t Tn = eps.size(0), R = eps.size(1), Z = eps.size(2), Bs = pq.size(1), Wd = pq.size(2);
  const int64_t nb = body_w.size();
  const T floor = static_cast<T>(floor_), hi = static_cast<T>(clip);
  auto opts = eps.options();
  Tensor ZIN = at::empty({Tn, R, Z}, opts), O = at::empty({Tn, R, 4 * Z}, opts), S = at::empty({Tn, R, 2 * Z}, opts);
  Tensor ZT = at::empty({Tn, R, Z}, opts), MUQ = at::empty({Tn, R, Z}, opts);
  std::vector<Tensor> U;
  for (int64_t k = 0; k <= nb; ++k) U.push_back(at::empty({Tn, R, Wd}, opts));
  Tensor ZC = z0.clone(), ZN = at::empty({R, Z}, opts);
  T* zc = ptr<T>(ZC);
  T* zn = ptr<T>(ZN);
  const T* kp = keep.defined() ? ptr<T>(keep) : nullptr;
  const int64_t* ap = anc.defined() ? anc.data_ptr<int64_t>() : nullptr;
  for (int64_t t = 0; t < Tn; ++t) {
    T* zin = ptr<T>(ZIN) + t * R * Z;
    std::copy(zc, zc + R * Z, zin);
    T* u = ptr<T>(U[0]) + t * R * Wd;
    fill_rows(u, Wd, ptr<T>(pq) + t * Bs * Wd, std::min(R, Bs), Wd, true);
    for (int64_t r = Bs; r < R; ++r) std::copy(u + (r % Bs) * Wd, u + (r % Bs + 1) * Wd, u + r * Wd);
    gemm<T>(R, Wd, Z, zin, Z, ptr<T>(w_z), true, T(1), u, Wd);
    relu_(u, R * Wd, hi);
    for (int64_t k = 0; k < nb; ++k) {
      T* v = ptr<T>(U[k + 1]) + t * R * Wd;
      fill_rows(v, Wd, ptr<T>(body_b[k]), R, Wd, false);
      gemm<T>(R, Wd, Wd, ptr<T>(U[k]) + t * R * Wd, Wd, ptr<T>(body_w[k]), true, T(1), v, Wd);
      relu_(v, R * Wd, hi);
    }
    T* o = ptr<T>(O) + t * R * 4 * Z;
    fill_rows(o, 4 * Z, ptr<T>(b_out), R, 4 * Z, false);
    gemm<T>(R, 4 * Z, Wd, ptr<T>(U[nb]) + t * R * Wd, Wd, ptr<T>(w_out), true, T(1), o, 4 * Z);
    T* sd = ptr<T>(S) + t * R * 2 * Z;
    T* zt = ptr<T>(ZT) + t * R * Z;
    T* mq = ptr<T>(MUQ) + t * R * Z;
    const T* e = ptr<T>(eps) + t * R * Z;
    for (int64_t r = 0; r < R; ++r) {
      const T* __restrict__ orow = o + r * 4 * Z;
      T* __restrict__ srow = sd + r * 2 * Z;
      for (int64_t j = 0; j < 2 * Z; ++j) srow[j] = softplus(orow[2 * Z + j]) + floor;
      const T* __restrict__ er = e + r * Z;
      T* __restrict__ mr = mq + r * Z;
      T* __restrict__ zr = zt + r * Z;
      if (residual)
        for (int64_t j = 0; j < Z; ++j) mr[j] = orow[j] + orow[Z + j];
      else
        for (int64_t j = 0; j < Z; ++j) mr[j] = orow[Z + j];
      for (int64_t j = 0; j < Z; ++j) zr[j] = mr[j] + srow[Z + j] * er[j];
      const bool kept = !kp || kp[t * R + r] != T(0);
      std::copy(kept ? zr : zc + r * Z, (kept ? zr : zc + r * Z) + Z, zn + r * Z);
    }
    gather_rows(zc, zn, ap && pos[t] >= 0 ? ap + pos[t] * R : nullptr, R, Z);
  }
  std::vector<Tensor> out{ZIN, O, S, ZT, MUQ, ZC};
  out.insert(out.end(), U.begin(), U.end());
  return out;
}

template <typename T>
std::vector<Tensor> chain_backward_impl(const Tensor& ZIN, const std::vector<Tensor>& U, const Tensor& O,
                                        const Tensor& eps, const Tensor& keep, const Tensor& anc,
                                        const std::vector<int64_t>& pos, const Tensor& gZ, const Tensor& gMuQ,
                                        const Tensor& gStdQ, const Tensor& gMuP, const Tensor& gStdP,
                                        const Tensor& gzf, const Tensor& w_z, const std::vector<Tensor>& body_w,
                                        const Tensor& w_out, bool residual, double clip) {
  const int64_t Tn = eps.size(0), R = eps.size(1), Z = eps.size(2), Wd = U[0].size(2);
  const T hi = static_cast<T>(clip);
  const int64_t nb = body_w.size();
  auto opts = eps.options();
  std::vector<Tensor> DA;
  for (int64_t k = 0; k <= nb; ++k) DA.push_back(at::empty({Tn, R, Wd}, opts));
  Tensor DO = at::empty({Tn, R, 4 * Z}, opts), DZ = at::empty({Tn, R, Z}, opts);
  Tensor dz = gzf.clone(), TMP = at::empty({R, Z}, opts), DU = at::empty({R, Wd}, opts), CARRY = at::empty({R, Z}, opts);
  T* dzp = ptr<T>(dz);
  T* tmp = ptr<T>(TMP);
  T* du = ptr<T>(DU);
  T* carry = ptr<T>(CARRY);
  const T* kp = keep.defined() ? ptr<T>(keep) : nullptr;
  const int64_t* ap = anc.defined() ? anc.data_ptr<int64_t>() : nullptr;
  for (int64_t t = Tn - 1; t >= 0; --t) {
    if (ap && pos[t] >= 0)  // the carried z was gathered after step t: scatter back
      scatter_back(dzp, tmp, ap + pos[t] * R, R, Z);
    T* dzt = ptr<T>(DZ) + t * R * Z;
    T* d = ptr<T>(DO) + t * R * 4 * Z;
    const T* o = ptr<T>(O) + t * R * 4 * Z;
    const int64_t s = t * R * Z;
    const T *gz = ptr<T>(gZ) + s, *gmq = ptr<T>(gMuQ) + s, *gsq = ptr<T>(gStdQ) + s, *gmp = ptr<T>(gMuP) + s,
            *gsp = ptr<T>(gStdP) + s, *e = ptr<T>(eps) + s;
    for (int64_t r = 0; r < R; ++r) {
      const T k = kp ? kp[t * R + r] : T(1), nk = T(1) - k;
      T* __restrict__ dr = d + r * 4 * Z;
      const T* __restrict__ orow = o + r * 4 * Z;
      const int64_t i0 = r * Z;
      const T* __restrict__ dzr = dzp + i0;
      T* __restrict__ cr = carry + i0;
      T* __restrict__ dtr = dzt + i0;
      for (int64_t j = 0; j < Z; ++j) {
        const T dzi = dzr[j] * k + gz[i0 + j];
        cr[j] = dzr[j] * nk;
        dtr[j] = dzi;
        const T dmq = dzi + gmq[i0 + j];
        dr[j] = residual ? gmp[i0 + j] + dmq : gmp[i0 + j];
        dr[Z + j] = dmq;
        dr[2 * Z + j] = gsp[i0 + j] * sigm(orow[2 * Z + j]);
        dr[3 * Z + j] = (gsq[i0 + j] + dzi * e[i0 + j]) * sigm(orow[3 * Z + j]);
      }
    }

    gemm<T>(R, Wd, 4 * Z, d, 4 * Z, ptr<T>(w_out), false, T(0), du, Wd);
    for (int64_t k = nb - 1; k >= 0; --k) {
      T* da = ptr<T>(DA[k + 1]) + t * R * Wd;
      relu_back(da, Wd, du, ptr<T>(U[k + 1]) + t * R * Wd, R, Wd, hi);
      gemm<T>(R, Wd, Wd, da, Wd, ptr<T>(body_w[k]), false, T(0), du, Wd);
    }
    T* da0 = ptr<T>(DA[0]) + t * R * Wd;
    relu_back(da0, Wd, du, ptr<T>(U[0]) + t * R * Wd, R, Wd, hi);
    std::copy(carry, carry + R * Z, dzp);  // dz = da0 . W_z + carry
    gemm<T>(R, Z, Wd, da0, Wd, ptr<T>(w_z), false, T(1), dzp, Z);
  }
  std::vector<Tensor> out{DO, DZ, dz};
  out.insert(out.end(), DA.begin(), DA.end());
  return out;
}

std::vector<Tensor> cont(std::vector<Tensor> ts) {
  for (auto& t : ts) t = t.contiguous();
  return ts;
}

std::vector<Tensor> chain_forward(Tensor pq, Tensor eps, c10::optional<Tensor> keep, c10::optional<Tensor> anc,
                                  std::vector<int64_t> pos, Tensor z0, Tensor w_z, std::vector<Tensor> body_w,
                                  std::vector<Tensor> body_b, Tensor w_out, Tensor b_out, bool residual,
                                  double floor_, double clip) {
  Tensor k = keep ? *keep : Tensor(), a = anc ? *anc : Tensor();
  for (auto* t : {&pq, &eps, &k, &a, &z0}) check(*t, eps, "vrnn chain input");
  TORCH_CHECK(int64_t(pos.size()) == eps.size(0), "vrnn chain: one ancestor position per step expected");
  TORCH_CHECK(pq.dim() == 3 && eps.dim() == 3 && pq.size(1) > 0 && eps.size(1) % pq.size(1) == 0 &&
              pq.size(0) == eps.size(0), "vrnn chain: rows must be a multiple of the sequences");
  TORCH_CHECK(z0.dim() == 2 && z0.size(0) == eps.size(1) && z0.size(1) == eps.size(2) &&
              w_z.size(0) == pq.size(2) && w_z.size(1) == eps.size(2) && w_out.size(0) == 4 * eps.size(2) &&
              w_out.size(1) == pq.size(2) && body_w.size() == body_b.size(), "vrnn chain: inconsistent shapes");
  TORCH_CHECK(!k.defined() || (k.size(0) == eps.size(0) && k.size(1) == eps.size(1)),
              "vrnn chain: keep must be (T, rows)");
  check_ancestors(a, pos, eps.size(1));
  at::NoGradGuard ng;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(eps.scalar_type(), "vrnn_chain_forward", [&] {
    out = chain_forward_impl<scalar_t>(pq, eps, k, a, pos, z0, w_z.contiguous(), cont(body_w), cont(body_b),
                                       w_out.contiguous(), b_out.contiguous(), residual, floor_, clip);
  });
  return out;
}

std::vector<Tensor> chain_backward(Tensor ZIN, std::vector<Tensor> U, Tensor O, Tensor eps,
                                   c10::optional<Tensor> keep, c10::optional<Tensor> anc, std::vector<int64_t> pos,
                                   Tensor gZ, Tensor gMuQ, Tensor gStdQ, Tensor gMuP, Tensor gStdP, Tensor gzf,
                                   Tensor w_z, std::vector<Tensor> body_w, Tensor w_out, bool residual,
                                   double clip) {
  Tensor k = keep ? *keep : Tensor(), a = anc ? *anc : Tensor();
  for (auto* t : {&ZIN, &O, &eps, &k, &a, &gZ, &gMuQ, &gStdQ, &gMuP, &gStdP, &gzf})
    check(*t, eps, "vrnn chain backward input");
  at::NoGradGuard ng;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(eps.scalar_type(), "vrnn_chain_backward", [&] {
    out = chain_backward_impl<scalar_t>(ZIN, cont(U), O, eps, k, a, pos, gZ, gMuQ, gStdQ, gMuP, gStdP, gzf,
                                        w_z.contiguous(), cont(body_w), w_out.contiguous(), residual, clip);
  });
  return out;
}

// ------------------------------------------------------------ the DKF's combiner chain
// fast_dkf.py's CombinerChain: per step h = tanh(W_c z_{t-1} + b_c), c = (h + a_t) / n,
// o = [mu, pre] = W_g c + b_g, std = softplus(pre) + floor, z_t = mu + std * eps_t, carried
// where keep, gathered by the ancestors. a (T, Bs, A) is shared by the k samples of a sequence.
template <typename T>
std::vector<Tensor> combiner_forward_impl(const Tensor& a, const Tensor& eps, const Tensor& keep, const Tensor& anc,
                                          const std::vector<int64_t>& pos, const Tensor& z0, const Tensor& w_c,
                                          const Tensor& b_c, const Tensor& w_g, const Tensor& b_g, double parts,
                                          double floor_) {
  const int64_t Tn = eps.size(0), R = eps.size(1), Z = eps.size(2), Bs = a.size(1), A = a.size(2);
  const T floor = static_cast<T>(floor_), n = static_cast<T>(parts);
  auto opts = eps.options();
  Tensor ZIN = at::empty({Tn, R, Z}, opts), H = at::empty({Tn, R, A}, opts), C = at::empty({Tn, R, A}, opts);
  Tensor O = at::empty({Tn, R, 2 * Z}, opts), S = at::empty({Tn, R, Z}, opts), ZT = at::empty({Tn, R, Z}, opts);
  Tensor ZC = z0.clone(), ZN = at::empty({R, Z}, opts);
  T* zc = ptr<T>(ZC);
  T* zn = ptr<T>(ZN);
  const T* kp = keep.defined() ? ptr<T>(keep) : nullptr;
  const int64_t* ap = anc.defined() ? anc.data_ptr<int64_t>() : nullptr;
  for (int64_t t = 0; t < Tn; ++t) {
    T* zin = ptr<T>(ZIN) + t * R * Z;
    std::copy(zc, zc + R * Z, zin);
    T* h = ptr<T>(H) + t * R * A;
    fill_rows(h, A, ptr<T>(b_c), R, A, false);
    gemm<T>(R, A, Z, zin, Z, ptr<T>(w_c), true, T(1), h, A);
    vtanh(h, h, R * A);
    T* c = ptr<T>(C) + t * R * A;
    const T* at_ = ptr<T>(a) + t * Bs * A;
    for (int64_t r = 0; r < R; ++r) {
      const T* __restrict__ hr = h + r * A;
      const T* __restrict__ ar = at_ + (r % Bs) * A;
      T* __restrict__ cr = c + r * A;
      for (int64_t j = 0; j < A; ++j) cr[j] = (ar[j] + hr[j]) / n;
    }
    T* o = ptr<T>(O) + t * R * 2 * Z;
    fill_rows(o, 2 * Z, ptr<T>(b_g), R, 2 * Z, false);
    gemm<T>(R, 2 * Z, A, c, A, ptr<T>(w_g), true, T(1), o, 2 * Z);
    T* sd = ptr<T>(S) + t * R * Z;
    T* zt = ptr<T>(ZT) + t * R * Z;
    const T* e = ptr<T>(eps) + t * R * Z;
    for (int64_t r = 0; r < R; ++r) {
      const T* __restrict__ orow = o + r * 2 * Z;
      T* __restrict__ srow = sd + r * Z;
      const T* __restrict__ er = e + r * Z;
      T* __restrict__ zr = zt + r * Z;
      for (int64_t j = 0; j < Z; ++j) srow[j] = softplus(orow[Z + j]) + floor;
      for (int64_t j = 0; j < Z; ++j) zr[j] = orow[j] + srow[j] * er[j];
      const bool kept = !kp || kp[t * R + r] != T(0);
      std::copy(kept ? zr : zc + r * Z, (kept ? zr : zc + r * Z) + Z, zn + r * Z);
    }
    gather_rows(zc, zn, ap && pos[t] >= 0 ? ap + pos[t] * R : nullptr, R, Z);
  }
  return {ZIN, H, C, O, S, ZT, ZC};
}

// Reverse: dz_t = carried gradient (where kept) + gZ_t; d[mu, pre] = [dz_t + gMu_t,
// (gStd_t + dz_t eps_t) sigmoid(pre)]; dc = d[mu, pre] W_g; d pre-tanh = dc (1 - h^2) / n;
// the gradient of z_{t-1} = d pre-tanh W_c + gZp_t (z_{t-1} is an output) + the carried part.
template <typename T>
std::vector<Tensor> combiner_backward_impl(const Tensor& H, const Tensor& O, const Tensor& eps, const Tensor& keep,
                                           const Tensor& anc, const std::vector<int64_t>& pos, const Tensor& gZ,
                                           const Tensor& gZp, const Tensor& gMu, const Tensor& gStd,
                                           const Tensor& gzf, const Tensor& w_c, const Tensor& w_g, double parts) {
  const int64_t Tn = eps.size(0), R = eps.size(1), Z = eps.size(2), A = H.size(2);
  const T n = static_cast<T>(parts);
  auto opts = eps.options();
  Tensor DO = at::empty({Tn, R, 2 * Z}, opts), DC = at::empty({Tn, R, A}, opts), DP = at::empty({Tn, R, A}, opts);
  Tensor DZ = at::empty({Tn, R, Z}, opts);
  Tensor dz = gzf.clone(), TMP = at::empty({R, Z}, opts), CARRY = at::empty({R, Z}, opts);
  T* dzp = ptr<T>(dz);
  T* tmp = ptr<T>(TMP);
  T* carry = ptr<T>(CARRY);
  const T* kp = keep.defined() ? ptr<T>(keep) : nullptr;
  const int64_t* ap = anc.defined() ? anc.data_ptr<int64_t>() : nullptr;
  for (int64_t t = Tn - 1; t >= 0; --t) {
    if (ap && pos[t] >= 0)  // the carried z was gathered after step t: scatter back
      scatter_back(dzp, tmp, ap + pos[t] * R, R, Z);
    T* d = ptr<T>(DO) + t * R * 2 * Z;
    const T* o = ptr<T>(O) + t * R * 2 * Z;
    const int64_t s = t * R * Z;
    const T *gz = ptr<T>(gZ) + s, *gzp = ptr<T>(gZp) + s, *gm = ptr<T>(gMu) + s, *gs = ptr<T>(gStd) + s,
            *e = ptr<T>(eps) + s;
    T* dzt = ptr<T>(DZ) + s;
    for (int64_t r = 0; r < R; ++r) {
      const T k = kp ? kp[t * R + r] : T(1), nk = T(1) - k;
      const int64_t i0 = r * Z;
      T* __restrict__ dr = d + r * 2 * Z;
      const T* __restrict__ orow = o + r * 2 * Z;
      for (int64_t j = 0; j < Z; ++j) {
        const T dzi = dzp[i0 + j] * k + gz[i0 + j];
        carry[i0 + j] = dzp[i0 + j] * nk + gzp[i0 + j];
        dzt[i0 + j] = dzi;
        dr[j] = dzi + gm[i0 + j];
        dr[Z + j] = (gs[i0 + j] + dzi * e[i0 + j]) * sigm(orow[Z + j]);
      }
    }
    T* dc = ptr<T>(DC) + t * R * A;
    gemm<T>(R, A, 2 * Z, d, 2 * Z, ptr<T>(w_g), false, T(0), dc, A);
    T* dp = ptr<T>(DP) + t * R * A;
    const T* h = ptr<T>(H) + t * R * A;
    for (int64_t i = 0; i < R * A; ++i) dp[i] = dc[i] / n * (T(1) - h[i] * h[i]);
    std::copy(carry, carry + R * Z, dzp);  // dz = dp . W_c + gZp_t + carry
    gemm<T>(R, Z, A, dp, A, ptr<T>(w_c), false, T(1), dzp, Z);
  }
  return {DO, DC, DP, DZ, dz};
}

std::vector<Tensor> combiner_forward(Tensor a, Tensor eps, c10::optional<Tensor> keep, c10::optional<Tensor> anc,
                                     std::vector<int64_t> pos, Tensor z0, Tensor w_c, Tensor b_c, Tensor w_g,
                                     Tensor b_g, double parts, double floor_) {
  Tensor k = keep ? *keep : Tensor(), g = anc ? *anc : Tensor();
  for (auto* t : {&a, &eps, &k, &g, &z0}) check(*t, eps, "vrnn combiner input");
  for (auto* t : {&w_c, &b_c, &w_g, &b_g}) TORCH_CHECK(t->scalar_type() == eps.scalar_type(), "vrnn combiner: dtype mismatch");
  TORCH_CHECK(int64_t(pos.size()) == eps.size(0), "vrnn combiner: one ancestor position per step expected");
  TORCH_CHECK(a.dim() == 3 && eps.dim() == 3 && a.size(1) > 0 && eps.size(1) % a.size(1) == 0 &&
              a.size(0) == eps.size(0), "vrnn combiner: rows must be a multiple of the sequences");
  const int64_t Z = eps.size(2), A = a.size(2);
  TORCH_CHECK(z0.dim() == 2 && z0.size(0) == eps.size(1) && z0.size(1) == Z && w_c.dim() == 2 && w_c.size(0) == A &&
              w_c.size(1) == Z && b_c.numel() == A && w_g.dim() == 2 && w_g.size(0) == 2 * Z && w_g.size(1) == A &&
              b_g.numel() == 2 * Z, "vrnn combiner: inconsistent shapes");
  TORCH_CHECK(!k.defined() || (k.size(0) == eps.size(0) && k.size(1) == eps.size(1)),
              "vrnn combiner: keep must be (T, rows)");
  check_ancestors(g, pos, eps.size(1));
  at::NoGradGuard ng;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(eps.scalar_type(), "vrnn_combiner_forward", [&] {
    out = combiner_forward_impl<scalar_t>(a, eps, k, g, pos, z0, w_c.contiguous(), b_c.contiguous(),
                                          w_g.contiguous(), b_g.contiguous(), parts, floor_);
  });
  return out;
}

std::vector<Tensor> combiner_backward(Tensor H, Tensor O, Tensor eps, c10::optional<Tensor> keep,
                                      c10::optional<Tensor> anc, std::vector<int64_t> pos, Tensor gZ, Tensor gZp,
                                      Tensor gMu, Tensor gStd, Tensor gzf, Tensor w_c, Tensor w_g, double parts) {
  Tensor k = keep ? *keep : Tensor(), g = anc ? *anc : Tensor();
  for (auto* t : {&H, &O, &eps, &k, &g, &gZ, &gZp, &gMu, &gStd, &gzf})
    check(*t, eps, "vrnn combiner backward input");
  at::NoGradGuard ng;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(eps.scalar_type(), "vrnn_combiner_backward", [&] {
    out = combiner_backward_impl<scalar_t>(H, O, eps, k, g, pos, gZ, gZp, gMu, gStd, gzf, w_c.contiguous(),
                                           w_g.contiguous(), parts);
  });
  return out;
}

}  // namespace

// csrc/kalman.cpp: the KVAE's Kalman filter, built into the same module
std::vector<Tensor> kalman_forward(Tensor A, Tensor J, Tensor y, Tensor q, Tensor m0, Tensor P0,
                                   c10::optional<Tensor> keep);
std::vector<Tensor> kalman_backward(Tensor A, Tensor J, Tensor y, c10::optional<Tensor> keep, Tensor mf,
                                    Tensor Pf, Tensor LP, Tensor LG, c10::optional<Tensor> gmp,
                                    c10::optional<Tensor> gPp, c10::optional<Tensor> gmT, c10::optional<Tensor> gPT);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_forward", &scan_forward, "the VRNN scan's forward loop");
  m.def("scan_backward", &scan_backward, "the VRNN scan's reverse loop");
  m.def("chain_forward", &chain_forward, "the SRNN z-chain's forward loop");
  m.def("chain_backward", &chain_backward, "the SRNN z-chain's reverse loop");
  m.def("combiner_forward", &combiner_forward, "the DKF combiner chain's forward loop");
  m.def("combiner_backward", &combiner_backward, "the DKF combiner chain's reverse loop");
  m.def("kalman_forward", &kalman_forward, "the KVAE's Kalman filter, forward");
  m.def("kalman_backward", &kalman_backward, "the KVAE's Kalman filter, reverse");
}
