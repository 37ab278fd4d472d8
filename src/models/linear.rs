//! Linear classifiers for sparse TF-IDF features.
//!
//! - `logreg`: L2-regularised logistic regression, solved in the dual by coordinate descent
//!   (the liblinear method, Yu, Huang & Lin 2011), with an unpenalised-in-spirit bias feature.
//! - `svm`: L2-regularised, squared-hinge linear SVM, dual coordinate descent (Hsieh et al.
//!   2008); probabilities through Platt scaling.
//! - `nbsvm`: the above on features scaled by the naive-Bayes log-count ratio of the training
//!   data (Wang & Manning 2012); the ratio is folded into the weights.
//! - `elasticnet`: logistic regression with an L1 + L2 penalty, by accelerated proximal
//!   gradient (FISTA with backtracking).
//!
//! Every solver is deterministic for a given seed, whatever the number of threads: parallel
//! sums are taken over fixed chunks and added in order.

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rng::Rng;
use super::sparse::Csr;

/// A model family and its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSpec {
    /// Logistic regression with an L2 penalty; `C` is the inverse regularisation strength.
    Logreg {
        /// Inverse regularisation strength: larger fits the training data more closely.
        #[serde(rename = "C")]
        c: f64,
    },
    /// Linear SVM (squared hinge loss, L2 penalty).
    Svm {
        /// Inverse regularisation strength: larger fits the training data more closely.
        #[serde(rename = "C")]
        c: f64,
    },
    /// Logistic regression with the elastic-net penalty `l1_ratio·|w|₁ + (1 − l1_ratio)/2·|w|²`.
    Elasticnet {
        /// Inverse regularisation strength: larger fits the training data more closely.
        #[serde(rename = "C")]
        c: f64,
        /// Share of the L1 penalty, in [0, 1].
        l1_ratio: f64,
    },
    /// Naive-Bayes-scaled features with a logistic (`log`) or squared-hinge (`hinge`) loss.
    Nbsvm {
        /// Inverse regularisation strength: larger fits the training data more closely.
        #[serde(rename = "C")]
        c: f64,
        /// Smoothing of the log-count ratio.
        #[serde(default = "one")]
        alpha: f64,
        /// `log`: logistic regression; `hinge`: squared-hinge SVM with Platt-scaled probabilities.
        #[serde(default)]
        loss: Loss,
        /// Interpolation between naive Bayes (towards 0) and the fitted weights (1): each weight
        /// becomes `(1 − beta)·mean|w| + beta·w` (Wang & Manning's β).
        #[serde(default = "one")]
        beta: f64,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    #[default]
    Log,
    Hinge,
}

fn one() -> f64 {
    1.0
}

impl ModelSpec {
    pub fn c(&self) -> f64 {
        match self {
            ModelSpec::Logreg { c }
            | ModelSpec::Svm { c }
            | ModelSpec::Elasticnet { c, .. }
            | ModelSpec::Nbsvm { c, .. } => *c,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        if !(self.c() > 0.0 && self.c().is_finite()) {
            return Err(format!("C must be a positive number, got {}", self.c()));
        }
        match self {
            ModelSpec::Elasticnet { l1_ratio, .. } if !(0.0..=1.0).contains(l1_ratio) => {
                Err(format!("l1_ratio must be in [0, 1], got {l1_ratio}"))
            }
            ModelSpec::Nbsvm { alpha, .. } if *alpha <= 0.0 => Err(format!("alpha must be positive, got {alpha}")),
            ModelSpec::Nbsvm { beta, .. } if !(*beta > 0.0 && *beta <= 1.0) => {
                Err(format!("beta must be in (0, 1], got {beta}"))
            }
            _ => Ok(()),
        }
    }
}

/// A fitted linear model: P(positive) = sigmoid(a · (w·x + b) + c), with (a, c) = (1, 0) unless
/// Platt-scaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearModel {
    pub spec: ModelSpec,
    #[serde(skip)]
    pub weights: Vec<f32>,
    pub bias: f64,
    pub platt: (f64, f64),
}

pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Sum of `f(i)` for `i` in `0..n`, identical for any thread count.
fn det_sum(n: usize, f: impl Fn(usize) -> f64 + Sync) -> f64 {
    const CHUNK: usize = 2048;
    let parts: Vec<f64> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| (c * CHUNK..((c + 1) * CHUNK).min(n)).map(&f).sum())
        .collect();
    parts.iter().sum()
}

impl LinearModel {
    pub fn decision_row(&self, cols: &[u32], vals: &[f32]) -> f64 {
        cols.iter()
            .zip(vals)
            .map(|(&j, &x)| self.weights[j as usize] as f64 * x as f64)
            .sum::<f64>()
            + self.bias
    }

    pub fn proba_row(&self, cols: &[u32], vals: &[f32]) -> f64 {
        let (a, c) = self.platt;
        sigmoid(a * self.decision_row(cols, vals) + c)
    }

    /// P(positive) for every row of `x`.
    pub fn predict_proba(&self, x: &Csr) -> Vec<f64> {
        (0..x.rows())
            .into_par_iter()
            .map(|i| {
                let (c, v) = x.row(i);
                self.proba_row(c, v)
            })
            .collect()
    }

    /// Fits the model on the rows `rows` of `x`, with labels `y` (1 positive, 0 negative; one
    /// per row of `x`).
    pub fn fit(spec: &ModelSpec, x: &Csr, y: &[u8], rows: &[usize], seed: u64) -> LinearModel {
        let signs: Vec<f64> = rows.iter().map(|&i| if y[i] == 1 { 1.0 } else { -1.0 }).collect();
        // A contiguous copy of the rows: the solvers sweep it many times.
        let x = x.select(rows);
        let (weights, bias, platt) = match spec {
            ModelSpec::Logreg { c } => {
                let (w, b) = dual_cd(&x, &signs, *c, Loss::Log, seed);
                (w, b, (1.0, 0.0))
            }
            ModelSpec::Svm { c } => {
                let (w, b) = dual_cd(&x, &signs, *c, Loss::Hinge, seed);
                let platt = platt_scale(&x, &signs, &w, b);
                (w, b, platt)
            }
            ModelSpec::Nbsvm { c, alpha, loss, beta } => {
                let r = nb_ratio(&x, &signs, *alpha);
                let scaled = x.scale_columns(&r.iter().map(|&v| v as f32).collect::<Vec<_>>());
                let (mut w, b) = dual_cd(&scaled, &signs, *c, *loss, seed);
                if *beta < 1.0 {
                    let mean = w.iter().map(|v| v.abs()).sum::<f64>() / w.len().max(1) as f64;
                    w.iter_mut().for_each(|v| *v = (1.0 - beta) * mean + beta * *v);
                }
                // Interpolated weights no longer give calibrated log-odds.
                let platt = if *loss == Loss::Hinge || *beta < 1.0 {
                    platt_scale(&scaled, &signs, &w, b)
                } else {
                    (1.0, 0.0)
                };
                (w.iter().zip(&r).map(|(w, r)| w * r).collect(), b, platt)
            }
            ModelSpec::Elasticnet { c, l1_ratio } => {
                let (w, b) = fista(&x, &signs, *c, *l1_ratio);
                (w, b, (1.0, 0.0))
            }
        };
        LinearModel {
            spec: spec.clone(),
            weights: weights.iter().map(|&w| w as f32).collect(),
            bias,
            platt,
        }
    }
}

/// Naive-Bayes log-count ratio r = ln((p/|p|₁) / (q/|q|₁)), p and q the smoothed counts of
/// positive and negative rows in which each feature occurs (binarised, as in Wang & Manning).
fn nb_ratio(x: &Csr, y: &[f64], alpha: f64) -> Vec<f64> {
    let mut p = vec![alpha; x.cols];
    let mut q = vec![alpha; x.cols];
    for (k, &yk) in y.iter().enumerate() {
        let target = if yk > 0.0 { &mut p } else { &mut q };
        let (cols, vals) = x.row(k);
        for (&j, &val) in cols.iter().zip(vals) {
            if val != 0.0 {
                target[j as usize] += 1.0;
            }
        }
    }
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    p.iter().zip(&q).map(|(p, q)| ((p / sp) / (q / sq)).ln()).collect()
}

/// Dual coordinate descent for L2-regularised logistic regression (`Log`) or squared-hinge SVM
/// (`Hinge`). A constant feature of value 1 provides the bias. Returns (weights, bias).
fn dual_cd(x: &Csr, y: &[f64], c: f64, loss: Loss, seed: u64) -> (Vec<f64>, f64) {
    let n = x.rows();
    let mut w = vec![0.0f64; x.cols];
    let mut b = 0.0f64;
    let qd: Vec<f64> = (0..n).map(|k| x.row_sq_norm(k) + 1.0).collect();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    let dot = |w: &[f64], b: f64, k: usize| x.dot(k, w) + b;
    let update = |w: &mut [f64], b: &mut f64, k: usize, delta: f64| {
        let (cols, vals) = x.row(k);
        for (&j, &v) in cols.iter().zip(vals) {
            w[j as usize] += delta * v as f64;
        }
        *b += delta;
    };
    match loss {
        Loss::Hinge => {
            let diag = 0.5 / c;
            let mut alpha = vec![0.0f64; n];
            for _ in 0..1000 {
                rng.shuffle(&mut order);
                let mut pg_max = f64::NEG_INFINITY;
                let mut pg_min = f64::INFINITY;
                for &i in &order {
                    let g = y[i] * dot(&w, b, i) - 1.0 + diag * alpha[i];
                    let pg = if alpha[i] == 0.0 { g.min(0.0) } else { g };
                    pg_max = pg_max.max(pg);
                    pg_min = pg_min.min(pg);
                    if pg.abs() > 1e-12 {
                        let old = alpha[i];
                        alpha[i] = (old - g / (qd[i] + diag)).max(0.0);
                        update(&mut w, &mut b, i, (alpha[i] - old) * y[i]);
                    }
                }
                if pg_max - pg_min < 0.1 {
                    break;
                }
            }
        }
        Loss::Log => {
            // alpha[2i] + alpha[2i+1] = C; both stay strictly inside (0, C).
            let mut alpha = vec![0.0f64; 2 * n];
            for i in 0..n {
                alpha[2 * i] = (0.001 * c).min(1e-8);
                alpha[2 * i + 1] = c - alpha[2 * i];
                update(&mut w, &mut b, i, y[i] * alpha[2 * i]);
            }
            let eps: f64 = 0.1;
            let mut inner_eps = 1e-2;
            let inner_eps_min = eps.min(1e-8);
            for _ in 0..1000 {
                rng.shuffle(&mut order);
                let mut newton_steps = 0usize;
                let mut g_max = 0.0f64;
                for &i in &order {
                    let a = qd[i];
                    let yw = y[i] * dot(&w, b, i);
                    let (mut i1, mut i2, mut sign) = (2 * i, 2 * i + 1, 1.0);
                    if 0.5 * a * (alpha[i2] - alpha[i1]) + yw < 0.0 {
                        (i1, i2, sign) = (2 * i + 1, 2 * i, -1.0);
                    }
                    let old = alpha[i1];
                    let mut z = if c - old < 0.5 * c { 0.1 * old } else { old };
                    let grad = |z: f64| a * (z - old) + sign * yw + (z / (c - z)).ln();
                    let mut gp = grad(z);
                    g_max = g_max.max(gp.abs());
                    let mut steps = 0;
                    while steps <= 100 && gp.abs() >= inner_eps {
                        let gpp = a + c / (c - z) / z;
                        let next = z - gp / gpp;
                        z = if next <= 0.0 { z * 0.1 } else { next };
                        gp = grad(z);
                        steps += 1;
                        newton_steps += 1;
                    }
                    if steps > 0 {
                        alpha[i1] = z;
                        alpha[i2] = c - z;
                        update(&mut w, &mut b, i, sign * (z - old) * y[i]);
                    }
                }
                if g_max < eps {
                    break;
                }
                if newton_steps <= n / 10 {
                    inner_eps = inner_eps_min.max(0.1 * inner_eps);
                }
            }
        }
    }
    (w, b)
}

/// Fits P = sigmoid(a·d + c) to decision values d by Newton's method, with Platt's smoothed
/// targets.
fn platt_scale(x: &Csr, y: &[f64], w: &[f64], b: f64) -> (f64, f64) {
    let d: Vec<f64> = (0..x.rows()).map(|k| x.dot(k, w) + b).collect();
    let pos = y.iter().filter(|&&v| v > 0.0).count() as f64;
    let neg = y.len() as f64 - pos;
    let t: Vec<f64> = y
        .iter()
        .map(|&v| {
            if v > 0.0 {
                (pos + 1.0) / (pos + 2.0)
            } else {
                1.0 / (neg + 2.0)
            }
        })
        .collect();
    let (mut a, mut c) = (1.0f64, 0.0f64);
    for _ in 0..50 {
        let (mut ga, mut gc, mut haa, mut hac, mut hcc) = (0.0, 0.0, 1e-12, 0.0, 1e-12);
        for (di, ti) in d.iter().zip(&t) {
            let p = sigmoid(a * di + c);
            let r = p - ti;
            let s = p * (1.0 - p);
            ga += r * di;
            gc += r;
            haa += s * di * di;
            hac += s * di;
            hcc += s;
        }
        let det = haa * hcc - hac * hac;
        if det.abs() < 1e-18 {
            break;
        }
        let da = (hcc * ga - hac * gc) / det;
        let dc = (haa * gc - hac * ga) / det;
        a -= da;
        c -= dc;
        if da.abs() < 1e-9 && dc.abs() < 1e-9 {
            break;
        }
    }
    (a, c)
}

/// FISTA for (1/n)·Σ log(1 + exp(−y(w·x + b))) + λ((1−ρ)/2·|w|² + ρ|w|₁), λ = 1/(C·n).
fn fista(x: &Csr, y: &[f64], c: f64, rho: f64) -> (Vec<f64>, f64) {
    let n = x.rows();
    let d = x.cols;
    let xt = x.transpose();
    let lambda = 1.0 / (c * n as f64);
    let smooth = |w: &[f64], b: f64| -> (f64, Vec<f64>) {
        // Loss and the derivative of each row's loss with respect to its margin.
        let margins: Vec<f64> = (0..n).into_par_iter().map(|i| x.dot(i, w) + b).collect();
        let loss = det_sum(n, |i| {
            let z = -y[i] * margins[i];
            if z > 0.0 {
                z + (-z).exp().ln_1p()
            } else {
                z.exp().ln_1p()
            }
        }) / n as f64;
        let r: Vec<f64> = (0..n).map(|i| -y[i] * sigmoid(-y[i] * margins[i]) / n as f64).collect();
        let l2: f64 = w.iter().map(|v| v * v).sum::<f64>() * 0.5 * lambda * (1.0 - rho);
        (loss + l2, r)
    };
    let grad = |w: &[f64], r: &[f64]| -> (Vec<f64>, f64) {
        let gw: Vec<f64> = (0..d)
            .into_par_iter()
            .map(|j| {
                let (rows, vals) = xt.row(j);
                rows.iter()
                    .zip(vals)
                    .map(|(&i, &v)| r[i as usize] * v as f64)
                    .sum::<f64>()
                    + lambda * (1.0 - rho) * w[j]
            })
            .collect();
        (gw, r.iter().sum())
    };
    let prox = |v: f64, t: f64| {
        let k = t * lambda * rho;
        if v > k {
            v - k
        } else if v < -k {
            v + k
        } else {
            0.0
        }
    };
    let l1 = |w: &[f64]| lambda * rho * w.iter().map(|v| v.abs()).sum::<f64>();

    let mut w = vec![0.0f64; d];
    let mut b = 0.0f64;
    let (mut zw, mut zb) = (w.clone(), b);
    let mut t = 1.0f64;
    let mut lip = 1.0f64;
    let mut prev_obj = f64::INFINITY;
    for _ in 0..500 {
        let (fz, r) = smooth(&zw, zb);
        let (gw, gb) = grad(&zw, &r);
        let (nw, nb, fnew) = loop {
            let step = 1.0 / lip;
            let nw: Vec<f64> = zw.iter().zip(&gw).map(|(z, g)| prox(z - step * g, step)).collect();
            let nb = zb - step * gb;
            let (fnew, _) = smooth(&nw, nb);
            let diff_sq: f64 = nw.iter().zip(&zw).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() + (nb - zb) * (nb - zb);
            let lin: f64 = nw.iter().zip(&zw).zip(&gw).map(|((a, b), g)| g * (a - b)).sum::<f64>() + gb * (nb - zb);
            if fnew <= fz + lin + 0.5 * lip * diff_sq + 1e-12 || lip > 1e12 {
                break (nw, nb, fnew);
            }
            lip *= 2.0;
        };
        let t_next = (1.0 + (1.0 + 4.0 * t * t).sqrt()) / 2.0;
        let momentum = (t - 1.0) / t_next;
        zw = nw.iter().zip(&w).map(|(a, b)| a + momentum * (a - b)).collect();
        zb = nb + momentum * (nb - b);
        w = nw;
        b = nb;
        t = t_next;
        let obj = fnew + l1(&w);
        if (prev_obj - obj).abs() <= 1e-7 * obj.abs().max(1e-12) {
            break;
        }
        prev_obj = obj;
    }
    (w, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two separable clusters: feature 0 for positives, feature 1 for negatives, feature 2 noise.
    fn data() -> (Csr, Vec<u8>) {
        let mut rows = Vec::new();
        let mut y = Vec::new();
        let mut rng = Rng::new(7);
        for i in 0..200 {
            let pos = i % 2 == 0;
            let noise = rng.unit() as f32;
            rows.push(if pos {
                vec![(0, 1.0), (2, noise)]
            } else {
                vec![(1, 1.0), (2, noise)]
            });
            y.push(pos as u8);
        }
        (Csr::from_rows(3, rows), y)
    }

    #[test]
    fn every_model_separates_separable_data() {
        let (x, y) = data();
        for spec in [
            ModelSpec::Logreg { c: 10.0 },
            ModelSpec::Svm { c: 1.0 },
            ModelSpec::Elasticnet { c: 10.0, l1_ratio: 0.5 },
            ModelSpec::Nbsvm {
                c: 1.0,
                alpha: 1.0,
                loss: Loss::Log,
                beta: 1.0,
            },
            ModelSpec::Nbsvm {
                c: 1.0,
                alpha: 1.0,
                loss: Loss::Hinge,
                beta: 1.0,
            },
        ] {
            let all: Vec<usize> = (0..x.rows()).collect();
            let m = LinearModel::fit(&spec, &x, &y, &all, 1);
            let p = m.predict_proba(&x);
            let correct = p.iter().zip(&y).filter(|(p, &l)| (**p > 0.5) == (l == 1)).count();
            assert_eq!(correct, 200, "{spec:?}");
            assert!(m.weights[0] > 0.0 && m.weights[1] < 0.0, "{spec:?}: {:?}", m.weights);
        }
    }

    #[test]
    fn nbsvm_beta_interpolates_towards_the_mean_weight() {
        let (x, y) = data();
        let all: Vec<usize> = (0..x.rows()).collect();
        let fit = |beta| {
            let spec = ModelSpec::Nbsvm {
                c: 1.0,
                alpha: 1.0,
                loss: Loss::Log,
                beta,
            };
            LinearModel::fit(&spec, &x, &y, &all, 1)
        };
        let (full, half) = (fit(1.0), fit(0.5));
        let spread = |m: &LinearModel| m.weights[0] - m.weights[1];
        assert!(spread(&half) > 0.0 && spread(&half) < spread(&full));
        assert_ne!(half.platt, (1.0, 0.0), "interpolated weights are calibrated again");
    }

    #[test]
    fn logistic_regression_matches_its_optimality_condition() {
        // At the optimum of C·Σ loss + |w|²/2 the gradient vanishes: w = C·Σ y σ(−y m) x.
        let (x, y) = data();
        let all: Vec<usize> = (0..x.rows()).collect();
        let m = LinearModel::fit(&ModelSpec::Logreg { c: 1.0 }, &x, &y, &all, 3);
        let mut g = [0.0f64; 3];
        for (i, &yi) in y.iter().enumerate() {
            let s = if yi == 1 { 1.0 } else { -1.0 };
            let (c, v) = x.row(i);
            let margin = m.decision_row(c, v);
            for (&j, &val) in c.iter().zip(v) {
                g[j as usize] += s * sigmoid(-s * margin) * val as f64;
            }
        }
        for (j, gj) in g.iter().enumerate() {
            let w = m.weights[j] as f64;
            assert!((w - gj).abs() < 0.05 * (1.0 + gj.abs()), "{j}: {w} vs {gj}");
        }
    }

    #[test]
    fn fits_do_not_depend_on_thread_count() {
        let (x, y) = data();
        let spec = ModelSpec::Elasticnet { c: 5.0, l1_ratio: 0.3 };
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let all: Vec<usize> = (0..x.rows()).collect();
        let a = one.install(|| LinearModel::fit(&spec, &x, &y, &all, 1));
        let b = three.install(|| LinearModel::fit(&spec, &x, &y, &all, 1));
        assert_eq!(a.weights, b.weights);
        assert_eq!(a.bias, b.bias);
    }
}
