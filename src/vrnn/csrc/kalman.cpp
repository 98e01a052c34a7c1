// The KVAE's Kalman filter (models/kvae.py, KVAE._filter), forward and hand-written
// backward through time, compiled. Per row and step t (n = state_dim, everything n x n):
//
//     m'_t = A_t m_{t-1},   P'_t = A_t P_{t-1} A_t^T + diag(q)           (the prediction)
//     P'_t = L_P L_P^T,  G = I + L_P^T J_t L_P = L_G L_G^T,
//     m_t = m'_t + L_P G^-1 L_P^T (y_t - J_t m'_t),  P_t = L_P G^-1 L_P^T   (the update)
//
// with J_t = C_t^T R^-1 C_t and y_t = C_t^T R^-1 a_t computed for all steps before the loop
// (their gradients, and everything that reads m'_t and P'_t afterwards, stay under
// autograd in Python). P_t = (P'_t^-1 + J_t)^-1, m_t = m'_t + P_t (y_t - J_t m'_t) are the
// information form; where keep_t is 0 the filtered state is carried (m_t = m_{t-1}). The
// outputs are m'_t, P'_t for every step and the last (m_T, P_T). The arithmetic is float64
// whatever the tensors' type; the Python loop of models/kvae.py is the reference this is
// tested against (tests/test_dvae.py).
//
// Backward, with m̄, P̄ the adjoints of (m_t, P_t), r = y_t - J_t m'_t and
// N = P_t P'_t^-1 = L_P G^-1 L_P^-1 (so N^T = I - J_t P_t):
//     ȳ_t = P_t m̄,   J̄_t = -P_t m̄ m'^T - P_t (P̄ + m̄ r^T) P_t,
//     m̄' += N^T m̄,   P̄' += N^T (P̄ + m̄ r^T) N,
// then through the prediction, with P̄' symmetrised (P'_t is symmetrised in the forward):
//     Ā_t = m̄' m_{t-1}^T + P̄' A_t (P_{t-1} + P_{t-1}^T),  q̄ += diag(P̄'),
//     m̄_{t-1} = A_t^T m̄',  P̄_{t-1} = A_t^T P̄' A_t   (plus m̄, P̄ where the step was not kept).
// J_t is read symmetrised, so J̄_t is returned symmetrised.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <vector>

using at::Tensor;

namespace {

// n x n (or n x k) row-major matrices of doubles
void mm(const double* a, const double* b, double* c, int n, bool ta, bool tb) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int k = 0; k < n; ++k) s += (ta ? a[k * n + i] : a[i * n + k]) * (tb ? b[j * n + k] : b[k * n + j]);
      c[i * n + j] = s;
    }
}

void mv(const double* a, const double* x, double* y, int n, bool ta) {
  for (int i = 0; i < n; ++i) {
    double s = 0;
    for (int k = 0; k < n; ++k) s += (ta ? a[k * n + i] : a[i * n + k]) * x[k];
    y[i] = s;
  }
}

// L (lower) with L L^T = the lower triangle of x, mirrored; false if not positive-definite
bool chol(const double* x, double* L, int n) {
  for (int i = 0; i < n * n; ++i) L[i] = 0;
  for (int j = 0; j < n; ++j) {
    double d = x[j * n + j];
    for (int k = 0; k < j; ++k) d -= L[j * n + k] * L[j * n + k];
    if (!(d > 0)) return false;
    d = std::sqrt(d);
    L[j * n + j] = d;
    for (int i = j + 1; i < n; ++i) {
      double s = x[i * n + j];
      for (int k = 0; k < j; ++k) s -= L[i * n + k] * L[j * n + k];
      L[i * n + j] = s / d;
    }
  }
  return true;
}

// b (n x k, row-major) := L^-1 b
void solve_l(const double* L, double* b, int n, int k) {
  for (int i = 0; i < n; ++i)
    for (int c = 0; c < k; ++c) {
      double s = b[i * k + c];
      for (int j = 0; j < i; ++j) s -= L[i * n + j] * b[j * k + c];
      b[i * k + c] = s / L[i * n + i];
    }
}

// b (n x k) := L^-T b
void solve_lt(const double* L, double* b, int n, int k) {
  for (int i = n - 1; i >= 0; --i)
    for (int c = 0; c < k; ++c) {
      double s = b[i * k + c];
      for (int j = i + 1; j < n; ++j) s -= L[j * n + i] * b[j * k + c];
      b[i * k + c] = s / L[i * n + i];
    }
}

void sym(double* x, int n) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < i; ++j) x[i * n + j] = x[j * n + i] = 0.5 * (x[i * n + j] + x[j * n + i]);
}

template <typename T> void load(const T* src, double* dst, int64_t k) {
  for (int64_t i = 0; i < k; ++i) dst[i] = static_cast<double>(src[i]);
}

template <typename T> void store(const double* src, T* dst, int64_t k) {
  for (int64_t i = 0; i < k; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename T>
std::vector<Tensor> forward_impl(const Tensor& A, const Tensor& J, const Tensor& y, const Tensor& q, const Tensor& m0,
                                 const Tensor& P0, const Tensor& keep) {
  const int64_t R = A.size(0), T_ = A.size(1);
  const int n = static_cast<int>(A.size(2));
  const int nn = n * n;
  auto f64 = A.options().dtype(at::kDouble);
  Tensor mp = at::empty({R, T_, n}, A.options()), Pp = at::empty({R, T_, n, n}, A.options());
  Tensor mf = at::empty({R, T_ + 1, n}, f64), Pf = at::empty({R, T_ + 1, n, n}, f64);
  Tensor LP = at::zeros({R, T_, n, n}, f64), LG = at::zeros({R, T_, n, n}, f64);
  const T *a_ = A.data_ptr<T>(), *j_ = J.data_ptr<T>(), *y_ = y.data_ptr<T>(), *m0_ = m0.data_ptr<T>(),
          *P0_ = P0.data_ptr<T>();
  const bool* keep_ = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  std::vector<double> qd(n);
  load(q.data_ptr<T>(), qd.data(), n);
  T *mp_ = mp.data_ptr<T>(), *Pp_ = Pp.data_ptr<T>();
  double *mf_ = mf.data_ptr<double>(), *Pf_ = Pf.data_ptr<double>(), *LP_ = LP.data_ptr<double>(),
         *LG_ = LG.data_ptr<double>();
  std::atomic<bool> failed{false};
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> Am(nn), Jm(nn), yv(n), AP(nn), P1(nn), G(nn), W(nn), m1(n), r(n), b(n);
    for (int64_t row = begin; row < end; ++row) {
      double* m = mf_ + row * (T_ + 1) * n;
      double* P = Pf_ + row * (T_ + 1) * nn;
      load(m0_ + row * n, m, n);
      load(P0_ + row * nn, P, nn);
      for (int64_t t = 0; t < T_; ++t, m += n, P += nn) {
        const int64_t st = row * T_ + t;
        load(a_ + st * nn, Am.data(), nn);
        mv(Am.data(), m, m1.data(), n, false);                       // m' = A m
        mm(Am.data(), P, AP.data(), n, false, false);
        mm(AP.data(), Am.data(), P1.data(), n, false, true);         // P' = A P A^T + diag(q)
        sym(P1.data(), n);
        for (int i = 0; i < n; ++i) P1[i * n + i] += qd[i];
        store(m1.data(), mp_ + st * n, n);
        store(P1.data(), Pp_ + st * nn, nn);
        double *mn = m + n, *Pn = P + nn;
        if (keep_ && !keep_[st]) {
          std::copy(m, m + n, mn);
          std::copy(P, P + nn, Pn);
          continue;
        }
        double *L = LP_ + st * nn, *Lg = LG_ + st * nn;
        load(j_ + st * nn, Jm.data(), nn);
        sym(Jm.data(), n);
        load(y_ + st * n, yv.data(), n);
        if (!chol(P1.data(), L, n)) { failed = true; return; }
        mm(Jm.data(), L, AP.data(), n, false, false);
        mm(L, AP.data(), G.data(), n, true, false);                  // G = I + L_P^T J L_P
        for (int i = 0; i < n; ++i) G[i * n + i] += 1.0;
        if (!chol(G.data(), Lg, n)) { failed = true; return; }
        mv(Jm.data(), m1.data(), r.data(), n, false);
        for (int i = 0; i < n; ++i) r[i] = yv[i] - r[i];             // r = y - J m'
        mv(L, r.data(), b.data(), n, true);                          // x = G^-1 L_P^T r
        solve_l(Lg, b.data(), n, 1);
        solve_lt(Lg, b.data(), n, 1);
        mv(L, b.data(), mn, n, false);
        for (int i = 0; i < n; ++i) mn[i] += m1[i];                  // m = m' + L_P x
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < n; ++j) W[i * n + j] = L[j * n + i];   // W = L_G^-1 L_P^T
        solve_l(Lg, W.data(), n, n);
        mm(W.data(), W.data(), Pn, n, true, false);                  // P = W^T W
      }
    }
  });
  TORCH_CHECK(!failed, "vrnn: the Kalman filter's covariance is not positive-definite");
  // copies (in float64 a plain .to would return views of the buffers saved for backward)
  Tensor mT = mf.select(1, T_).to(A.scalar_type(), false, true), PT = Pf.select(1, T_).to(A.scalar_type(), false, true);
  return {mp, Pp, mT, PT, mf, Pf, LP, LG};
}

template <typename T>
std::vector<Tensor> backward_impl(const Tensor& A, const Tensor& J, const Tensor& y, const Tensor& keep,
                                  const Tensor& mf, const Tensor& Pf, const Tensor& LP,
                                  const Tensor& LG, const Tensor& gmp, const Tensor& gPp, const Tensor& gmT,
                                  const Tensor& gPT) {
  const int64_t R = A.size(0), T_ = A.size(1);
  const int n = static_cast<int>(A.size(2));
  const int nn = n * n;
  Tensor gA = at::empty_like(A), gJ = at::empty_like(J), gy = at::empty_like(y);
  Tensor gq = at::zeros({R, n}, A.options().dtype(at::kDouble));
  Tensor gm0 = at::empty({R, n}, A.options()), gP0 = at::empty({R, n, n}, A.options());
  const T *a_ = A.data_ptr<T>(), *j_ = J.data_ptr<T>(), *y_ = y.data_ptr<T>();
  const T* gmp_ = gmp.defined() ? gmp.data_ptr<T>() : nullptr;
  const T* gPp_ = gPp.defined() ? gPp.data_ptr<T>() : nullptr;
  const T* gmT_ = gmT.defined() ? gmT.data_ptr<T>() : nullptr;
  const T* gPT_ = gPT.defined() ? gPT.data_ptr<T>() : nullptr;
  const bool* keep_ = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  const double *mf_ = mf.data_ptr<double>(), *Pf_ = Pf.data_ptr<double>(), *LP_ = LP.data_ptr<double>(),
               *LG_ = LG.data_ptr<double>();
  T *gA_ = gA.data_ptr<T>(), *gJ_ = gJ.data_ptr<T>(), *gy_ = gy.data_ptr<T>(), *gm0_ = gm0.data_ptr<T>(),
    *gP0_ = gP0.data_ptr<T>();
  double* gq_ = gq.data_ptr<double>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> gm(n), gP(nn), Am(nn), Jm(nn), m1(n), r(n), rb(n), Gt(nn), N(nn), X(nn), Y(nn), Gm(n),
        GP(nn), out(nn), tmp(nn);
    for (int64_t row = begin; row < end; ++row) {
      if (gmT_) load(gmT_ + row * n, gm.data(), n); else std::fill(gm.begin(), gm.end(), 0.0);
      if (gPT_) load(gPT_ + row * nn, gP.data(), nn); else std::fill(gP.begin(), gP.end(), 0.0);
      for (int64_t t = T_ - 1; t >= 0; --t) {
        const int64_t st = row * T_ + t;
        const double* m_prev = mf_ + (row * (T_ + 1) + t) * n;
        const double* P_prev = Pf_ + (row * (T_ + 1) + t) * nn;
        const double* P = P_prev + nn;  // filtered at t
        if (gmp_) load(gmp_ + st * n, Gm.data(), n); else std::fill(Gm.begin(), Gm.end(), 0.0);
        if (gPp_) load(gPp_ + st * nn, GP.data(), nn); else std::fill(GP.begin(), GP.end(), 0.0);
        const bool kept = !keep_ || keep_[st];
        load(a_ + st * nn, Am.data(), nn);
        if (kept) {
          const double *L = LP_ + st * nn, *Lg = LG_ + st * nn;
          load(j_ + st * nn, Jm.data(), nn);
          sym(Jm.data(), n);
          mv(Am.data(), m_prev, m1.data(), n, false);                          // m' = A m (as the forward had it)
          load(y_ + st * n, r.data(), n);
          mv(Jm.data(), m1.data(), rb.data(), n, false);
          for (int i = 0; i < n; ++i) r[i] -= rb[i];                        // r = y - J m'
          for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) Gt[i * n + j] = gP[i * n + j] + gm[i] * r[j];  // P̄ + m̄ r^T
          mv(P, gm.data(), rb.data(), n, false);                             // ȳ = P m̄
          store(rb.data(), gy_ + st * n, n);
          mm(P, Gt.data(), X.data(), n, false, false);
          mm(X.data(), P, Y.data(), n, false, false);                        // P (P̄ + m̄ r^T) P
          for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) out[i * n + j] = -rb[i] * m1[j] - Y[i * n + j];
          sym(out.data(), n);
          store(out.data(), gJ_ + st * nn, nn);
          // N = L_P G^-1 L_P^-1
          std::fill(X.begin(), X.end(), 0.0);
          for (int i = 0; i < n; ++i) X[i * n + i] = 1.0;
          solve_l(L, X.data(), n, n);
          solve_l(Lg, X.data(), n, n);
          solve_lt(Lg, X.data(), n, n);
          mm(L, X.data(), N.data(), n, false, false);
          mv(N.data(), gm.data(), rb.data(), n, true);
          for (int i = 0; i < n; ++i) Gm[i] += rb[i];                         // m̄' += N^T m̄
          mm(Gt.data(), N.data(), X.data(), n, false, false);
          mm(N.data(), X.data(), Y.data(), n, true, false);
          for (int i = 0; i < nn; ++i) GP[i] += Y[i];                         // P̄' += N^T (.) N
        } else {
          std::fill(gy_ + st * n, gy_ + (st + 1) * n, T(0));
          std::fill(gJ_ + st * nn, gJ_ + (st + 1) * nn, T(0));
        }
        sym(GP.data(), n);
        for (int i = 0; i < n; ++i) gq_[row * n + i] += GP[i * n + i];
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < n; ++j) tmp[i * n + j] = P_prev[i * n + j] + P_prev[j * n + i];
        mm(GP.data(), Am.data(), X.data(), n, false, false);
        mm(X.data(), tmp.data(), out.data(), n, false, false);
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < n; ++j) out[i * n + j] += Gm[i] * m_prev[j];     // Ā
        store(out.data(), gA_ + st * nn, nn);
        mv(Am.data(), Gm.data(), rb.data(), n, true);                          // A^T m̄'
        mm(Am.data(), X.data(), Y.data(), n, true, false);                     // A^T P̄' A
        if (kept) {
          std::copy(rb.begin(), rb.end(), gm.begin());
          std::copy(Y.begin(), Y.end(), gP.begin());
        } else {
          for (int i = 0; i < n; ++i) gm[i] += rb[i];
          for (int i = 0; i < nn; ++i) gP[i] += Y[i];
        }
      }
      store(gm.data(), gm0_ + row * n, n);
      store(gP.data(), gP0_ + row * nn, nn);
    }
  });
  return {gA, gJ, gy, gq.sum(0).to(A.scalar_type()), gm0, gP0};
}

void check(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device().is_cpu() && t.is_contiguous(),
              "vrnn kalman: ", name, " must be a contiguous CPU tensor of the filter's type");
}

}  // namespace

std::vector<Tensor> kalman_forward(Tensor A, Tensor J, Tensor y, Tensor q, Tensor m0, Tensor P0,
                                   c10::optional<Tensor> keep) {
  for (auto* p : {&A, &J, &y, &q, &m0, &P0}) check(*p, A, "every input");
  Tensor k = keep.has_value() ? keep->contiguous() : Tensor();
  TORCH_CHECK(A.dim() == 4 && A.size(2) == A.size(3), "vrnn kalman: A must be (rows, T, n, n)");
  const int64_t R = A.size(0), T = A.size(1), n = A.size(2);
  TORCH_CHECK(J.sizes() == A.sizes() && y.dim() == 3 && y.size(0) == R && y.size(1) == T && y.size(2) == n &&
              q.dim() == 1 && q.size(0) == n && m0.dim() == 2 && m0.size(0) == R && m0.size(1) == n &&
              P0.dim() == 3 && P0.size(0) == R && P0.size(1) == n && P0.size(2) == n,
              "vrnn kalman: inconsistent shapes");
  TORCH_CHECK(!k.defined() || (k.scalar_type() == at::kBool && k.dim() == 2 && k.size(0) == R && k.size(1) == T),
              "vrnn kalman: keep must be bool (rows, T)");
  at::NoGradGuard ng;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "vrnn_kalman_forward", [&] {
    out = forward_impl<scalar_t>(A, J, y, q, m0, P0, k);
  });
  return out;
}

std::vector<Tensor> kalman_backward(Tensor A, Tensor J, Tensor y, c10::optional<Tensor> keep, Tensor mf,
                                    Tensor Pf, Tensor LP, Tensor LG, c10::optional<Tensor> gmp,
                                    c10::optional<Tensor> gPp, c10::optional<Tensor> gmT, c10::optional<Tensor> gPT) {
  auto opt = [](const c10::optional<Tensor>& t) { return t.has_value() ? t->contiguous() : Tensor(); };
  at::NoGradGuard ng;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "vrnn_kalman_backward", [&] {
    out = backward_impl<scalar_t>(A, J, y, opt(keep), mf, Pf, LP, LG, opt(gmp), opt(gPp), opt(gmT), opt(gPT));
  });
  return out;
}
