// The loops of vrnn's fused scans (fast.py: the VRNN's encoder -> z -> phi_z -> cell chain),
// forward and hand-written backward through time, compiled. What the loops compute is
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
#include <vector>

using at::Tensor;

namespace {

template <typename T> inline T sigm(T x) { return T(1) / (T(1) + std::exp(-x)); }
template <typename T> inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }

template <typename T> inline T* ptr(const Tensor& t) { return t.data_ptr<T>(); }

// x (rows, n) <- relu(x), in place
template <typename T> void relu_(T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] > T(0) ? x[i] : T(0);
}

// d (rows, n) <- g * (y > 0), y a ReLU's output; d may have a row stride (ld)
template <typename T>
void relu_back(T* d, int64_t ld, const T* g, const T* y, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) d[r * ld + j] = y[r * n + j] > T(0) ? g[r * n + j] : T(0);
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
  Tensor HN = at::empty({R, H}, opts), CN = at::empty({R, H}, opts);
  // transposed views of the weights, made once
  Tensor w_catT = W.w_cat.t(), w_gT = W.w_g.t(), w_zT = W.w_z.t();
  std::vector<Tensor> body_wT, phiz_wT;
  for (auto& w : W.body_w) body_wT.push_back(w.t());
  for (auto& w : W.phiz_w) phiz_wT.push_back(w.t());
  auto HSs = HS.unbind(0), CSs = CS.unbind(0), ZSs = ZS.unbind(0);
  std::vector<std::vector<Tensor>> Us, Qs;
  for (auto& u : U) Us.push_back(u.unbind(0));
  for (auto& q : Q) Qs.push_back(q.unbind(0));
  const T* axp = ptr<T>(ax);
  const T* gxp = ptr<T>(gx);
  const T* epsp = ptr<T>(eps);
  const T* kp = keep.defined() ? ptr<T>(keep) : nullptr;
  const int64_t* ap = anc.defined() ? anc.data_ptr<int64_t>() : nullptr;
  T* eg = ptr<T>(EG);
  T* o = ptr<T>(O);
  T* gi = ptr<T>(GI);
  for (int64_t t = 0; t < Tn; ++t) {
    const Tensor& h = HSs[t];
    if (W.b_cat.defined()) at::addmm_out(EG, W.b_cat, h, w_catT);
    else at::mm_out(EG, h, w_catT);
    // encoder's first layer: relu(ax_t + e_h)
    {
      T* u = ptr<T>(Us[0][t]);
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
      at::addmm_out(Us[k + 1][t], W.body_b[k], Us[k][t], body_wT[k]);
      relu_(ptr<T>(Us[k + 1][t]), Us[k + 1][t].numel());
    }
    at::addmm_out(O, W.b_g, Us[nb][t], w_gT);
    {  // mu, std = softplus(pre) + floor, z = mu + std * eps
      T* mu = ptr<T>(MU) + t * R * Z;
      T* pre = ptr<T>(PRE) + t * R * Z;
      T* sd = ptr<T>(STD) + t * R * Z;
      T* z = ptr<T>(ZS) + t * R * Z;
      const T* e = epsp + t * R * Z;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < Z; ++j) {
          const T m = o[r * 2 * Z + j], p = o[r * 2 * Z + Z + j];
          const T s = softplus(p) + floor;
          const int64_t i = r * Z + j;
          mu[i] = m;
          pre[i] = p;
          sd[i] = s;
          z[i] = m + s * e[i];
        }
    }
    const Tensor* q = &ZSs[t];
    for (int64_t k = 0; k < np; ++k) {
      at::addmm_out(Qs[k][t], W.phiz_b[k], *q, phiz_wT[k]);
      relu_(ptr<T>(Qs[k][t]), Qs[k][t].numel());
      q = &Qs[k][t];
    }
    at::mm_out(GI, *q, w_zT);
    // the cell
    const bool gather = ap && pos[t] >= 0;
    T* hn = gather ? ptr<T>(HN) : ptr<T>(HSs[t + 1]);
    T* cn = gather ? ptr<T>(CN) : ptr<T>(CSs[t + 1]);
    const T* hp = ptr<T>(h);
    const T* cp = ptr<T>(CSs[t]);
    const T* g = gxp + t * Bs * G;
    T* act = ptr<T>(ACT) + t * R * na * H;
    for (int64_t r = 0; r < R; ++r) {
      const T* gr = g + (r % Bs) * G;
      const T* gir = gi + r * G;
      const T* ghr = eg + r * (E + G) + E;
      T* ar = act + r * na * H;
      const bool kept = !kp || kp[t * R + r] != T(0);
      for (int64_t j = 0; j < H; ++j) {
        const int64_t i = r * H + j;
        T hv, cv;
        if (lstm) {
          const T si = sigm((gr[j] + gir[j]) + ghr[j]);
          const T sf = sigm((gr[H + j] + gir[H + j]) + ghr[H + j]);
          const T tg = std::tanh((gr[2 * H + j] + gir[2 * H + j]) + ghr[2 * H + j]);
          const T so = sigm((gr[3 * H + j] + gir[3 * H + j]) + ghr[3 * H + j]);
          cv = sf * cp[i] + si * tg;
          const T tc = std::tanh(cv);
          hv = so * tc;
          ar[j] = si; ar[H + j] = sf; ar[2 * H + j] = tg; ar[3 * H + j] = so; ar[4 * H + j] = tc;
        } else {
          const T rr = sigm((gr[j] + gir[j]) + ghr[j]);
          const T uu = sigm((gr[H + j] + gir[H + j]) + ghr[H + j]);
          const T hh = ghr[2 * H + j];
          const T n = std::tanh((gr[2 * H + j] + gir[2 * H + j]) + rr * hh);
          hv = (T(1) - uu) * n + uu * hp[i];
          cv = cp[i];
          ar[j] = rr; ar[H + j] = uu; ar[2 * H + j] = n; ar[3 * H + j] = hh;
        }
        hn[i] = kept ? hv : hp[i];
        cn[i] = kept ? cv : cp[i];
      }
    }
    if (gather) {  // each row continues from its ancestor
      const int64_t* a = ap + pos[t] * R;
      T* hd = ptr<T>(HSs[t + 1]);
      T* cd = ptr<T>(CSs[t + 1]);
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
  auto DEGs = DEG.unbind(0), DGIs = DGI.unbind(0), DOs = DO.unbind(0), DZs = DZ.unbind(0);
  auto gHps = gHp.unbind(0), gZs = gZ.unbind(0), gFzs = gFz.unbind(0);
  std::vector<std::vector<Tensor>> DAs, DPs;
  for (auto& d : DA) DAs.push_back(d.unbind(0));
  for (auto& d : DP) DPs.push_back(d.unbind(0));
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
    if (ap && pos[t] >= 0) {  // the state after step t was gathered: scatter its gradient back
      const int64_t* a = ap + pos[t] * R;
      for (T* d : {dhp, dcp}) {
        std::fill(tmp, tmp + R * H, T(0));
        for (int64_t r = 0; r < R; ++r)
          for (int64_t j = 0; j < H; ++j) tmp[a[r] * H + j] += d[r * H + j];
        std::copy(tmp, tmp + R * H, d);
      }
    }
    const T* act = ptr<T>(ACT) + t * R * na * H;
    const T* hprev = hsp + t * R * H;
    const T* cprev = csp + t * R * H;
    T* deg = ptr<T>(DEGs[t]);
    const int64_t ld = E + G;
    T* dgi = lstm ? deg + E : ptr<T>(DGIs[t]);
    const int64_t ldg = lstm ? ld : G;
    for (int64_t r = 0; r < R; ++r) {
      const T k = kp ? kp[t * R + r] : T(1);
      const T* ar = act + r * na * H;
      for (int64_t j = 0; j < H; ++j) {
        const int64_t i = r * H + j;
        const T dh_ = kp ? dhp[i] * k : dhp[i];
        if (kp) ch[i] = dhp[i] * (T(1) - k);
        dhn[i] = dh_;
        if (lstm) {
          const T si = ar[j], sf = ar[H + j], tg = ar[2 * H + j], so = ar[3 * H + j], tc = ar[4 * H + j];
          const T dcn = kp ? dcp[i] * k : dcp[i];
          const T dct = dcn + (dh_ * so) * (T(1) - tc * tc);
          T* d = dgi + r * ldg;
          d[j] = (dct * tg) * (si - si * si);
          d[H + j] = (dct * cprev[i]) * (sf - sf * sf);
          d[2 * H + j] = (dct * si) * (T(1) - tg * tg);
          d[3 * H + j] = (dh_ * tc) * (so - so * so);
          T dcv = dct * sf;
          if (kp) dcv += dcp[i] * (T(1) - k);
          dcp[i] = dcv;
        } else {
          const T rr = ar[j], u = ar[H + j], n = ar[2 * H + j], hh = ar[3 * H + j];
          const T dn = dh_ - dh_ * u;
          const T dnp = dn * (T(1) - n * n);
          T* d = dgi + r * ldg;
          T* e = deg + r * ld + E;
          d[2 * H + j] = dnp;
          d[j] = (dnp * hh) * (rr - rr * rr);
          d[H + j] = (dh_ * (hprev[i] - n)) * (u - u * u);
          e[j] = d[j];
          e[H + j] = d[H + j];
          e[2 * H + j] = dnp * rr;
        }
      }
    }
    // phi_z, then z = mu + std * eps
    at::addmm_out(np ? DQ[np - 1] : DZs[t], gFzs[t], DGIs[t], W.w_z);
    for (int64_t k = np - 1; k >= 0; --k) {
      const Tensor& dp = DPs[k][t];
      relu_back(ptr<T>(dp), dp.size(1), ptr<T>(DQ[k]), ptr<T>(Q[k]) + t * R * dp.size(1), R, dp.size(1));
      if (k == 0) at::addmm_out(DZs[t], gZs[t], dp, W.phiz_w[0]);
      else at::mm_out(DQ[k - 1], dp, W.phiz_w[k]);
    }
    {
      const T* dz = ptr<T>(DZs[t]);
      const T* gmu = ptr<T>(gMu) + t * R * Z;
      const T* gsd = ptr<T>(gStd) + t * R * Z;
      const T* e = ptr<T>(eps) + t * R * Z;
      const T* pre = ptr<T>(PRE) + t * R * Z;
      T* d = ptr<T>(DOs[t]);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < Z; ++j) {
          const int64_t i = r * Z + j;
          d[r * 2 * Z + j] = dz[i] + gmu[i];
          d[r * 2 * Z + Z + j] = (gsd[i] + dz[i] * e[i]) * sigm(pre[i]);
        }
    }
    // encoder, top down to its first layer's pre-activation
    at::mm_out(DU[nb], DOs[t], W.w_g);
    for (int64_t k = nb - 1; k >= 0; --k) {
      const Tensor& da = DAs[k + 1][t];
      const int64_t n = da.size(1);
      relu_back(ptr<T>(da), n, ptr<T>(DU[k + 1]), ptr<T>(U[k + 1]) + t * R * n, R, n);
      at::mm_out(DU[k], da, W.body_w[k]);
    }
    relu_back(deg, ld, ptr<T>(DU[0]), ptr<T>(U[0]) + t * R * E, R, E);
    // back into h_{t-1}: the encoder's first layer and w_h together, plus h_prev's gradient
    at::addmm_out(dh, gHps[t], DEGs[t], W.w_cat);
    if (!lstm || kp) {
      const T* ar0 = ptr<T>(ACT) + t * R * na * H;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < H; ++j) {
          const int64_t i = r * H + j;
          if (!lstm) dhp[i] += dhn[i] * ar0[r * na * H + H + j];  // the u * h_{t-1} path
          if (kp) dhp[i] += ch[i];
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
  W.w_cat = w_cat;
  if (b_cat) W.b_cat = *b_cat;
  W.body_w = body_w; W.body_b = body_b; W.phiz_w = phiz_w; W.phiz_b = phiz_b;
  W.w_g = w_g; W.b_g = b_g; W.w_z = w_z;
  return W;
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_forward", &scan_forward, "the VRNN scan's forward loop");
  m.def("scan_backward", &scan_backward, "the VRNN scan's reverse loop");
}
