//! Known-answer tests of the factorizations.

use faer::{Mat, MatRef};

use super::*;

use test_support::Rng;

fn matrix(rng: &mut Rng, rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |_, _| rng.normal())
}

/// X = Z·diag(d)·G `[n, dim]` with d_j decaying from 1 to 10^-1.5: strongly non-isotropic,
/// full column rank.
fn planted_samples(rng: &mut Rng, n: usize, dim: usize) -> Mat<f64> {
    let Z = matrix(rng, n, dim);
    let G = matrix(rng, dim, dim);
    let d: Vec<f64> = (0..dim)
        .map(|j| 10f64.powf(-1.5 * j as f64 / (dim - 1) as f64))
        .collect();
    let Zd = Mat::from_fn(n, dim, |t, j| Z[(t, j)] * d[j]);
    &Zd * &G
}

fn fro(M: MatRef<'_, f64>) -> f64 {
    M.norm_l2()
}

/// ‖X(W − Ŵ)ᵀ‖_F.
fn output_error(X: &Mat<f64>, W: &Mat<f64>, W_hat: &Mat<f64>) -> f64 {
    fro((X * (W - W_hat).transpose()).as_ref())
}

/// Round-off tolerance for a quantity of magnitude `scale` computed from matrices with
/// `entries` elements; 1e6 covers the conditioning of the planted covariance (κ(S) ≈ 1e3–1e4).
fn tol(scale: f64, entries: usize) -> f64 {
    1e6 * f64::EPSILON * (entries as f64).sqrt() * scale
}

fn care(root: SquareRoot) -> Method {
    Method::Care { root }
}

const NO_DAMPING: FactorOptions = FactorOptions { damping: 0.0 };

fn reconstruct(
    method: Method,
    W: &Mat<f64>,
    stats: &InputStats,
    opts: &FactorOptions,
    r: usize,
) -> Mat<f64> {
    decompose(method, W.as_ref(), stats, opts)
        .unwrap()
        .truncate(r)
        .unwrap()
        .reconstruct()
}

#[test]
fn care_reaches_the_eckart_young_optimum_of_the_outputs() {
    let mut rng = Rng::new(1);
    let (n, dim, out) = (200, 16, 10);
    let X = planted_samples(&mut rng, n, dim);
    let W = matrix(&mut rng, out, dim);
    let stats = InputStats::from_samples(X.as_ref());
    // Independent oracle: XŴᵀ ranges over all rank-r maps into col(X) (X has full column rank),
    // and XWᵀ lies in col(X), so the optimum is the Eckart–Young tail of Y = XWᵀ itself.
    let Y = &X * W.transpose();
    let sigma_Y: Vec<f64> = Y.singular_values().unwrap();
    let scale = fro(Y.as_ref());
    let t = tol(scale, n * dim);

    let sym = decompose(care(SquareRoot::Symmetric), W.as_ref(), &stats, &NO_DAMPING).unwrap();
    let chol = decompose(care(SquareRoot::Cholesky), W.as_ref(), &stats, &NO_DAMPING).unwrap();
    let damped = decompose(
        care(SquareRoot::Symmetric),
        W.as_ref(),
        &stats,
        &FactorOptions::default(),
    )
    .unwrap();
    let plain = decompose(Method::PlainSvd, W.as_ref(), &stats, &NO_DAMPING).unwrap();
    let asvd = decompose(
        Method::Asvd {
            alpha: DEFAULT_ASVD_ALPHA,
        },
        W.as_ref(),
        &stats,
        &NO_DAMPING,
    )
    .unwrap();
    for (s, s_Y) in sym.spectrum().iter().zip(&sigma_Y) {
        assert!(
            (s - s_Y).abs() <= t,
            "σ(√C-whitened W) must equal σ(XWᵀ): {s} vs {s_Y}"
        );
    }
    assert_eq!(
        sym.rescues(),
        &Rescues::default(),
        "δ = 0 and full-rank C need no rescue"
    );

    let mut plain_gap = 0.0f64;
    for r in 1..out {
        let optimum = sigma_Y[r..].iter().map(|s| s * s).sum::<f64>().sqrt();
        let err = |d: &Decomposition| output_error(&X, &W, &d.truncate(r).unwrap().reconstruct());
        let (e_sym, e_chol, e_damped, e_plain, e_asvd) =
            (err(&sym), err(&chol), err(&damped), err(&plain), err(&asvd));
        assert!(
            (e_sym - optimum).abs() <= t,
            "r={r}: CARE(√C) {e_sym} vs optimum {optimum}"
        );
        assert!(
            (e_chol - optimum).abs() <= t,
            "r={r}: CARE(Cholesky) {e_chol} vs optimum {optimum}"
        );
        assert!((sym.tail_norm(r) - optimum).abs() <= t, "r={r}: tail_norm");
        assert!(
            e_sym <= e_plain + t,
            "r={r}: CARE {e_sym} > plain SVD {e_plain}"
        );
        assert!(e_sym <= e_asvd + t, "r={r}: CARE {e_sym} > ASVD {e_asvd}");
        assert!(
            e_damped >= optimum - t,
            "r={r}: damped CARE below the optimum"
        );
        assert!(
            e_damped <= e_plain,
            "r={r}: damped CARE {e_damped} worse than plain {e_plain}"
        );
        plain_gap = plain_gap.max(e_plain / optimum);
    }
    // The planted covariance is far from isotropic, so the comparison above is not vacuous.
    assert!(
        plain_gap > 1.2,
        "plain SVD should be clearly suboptimal, worst ratio {plain_gap}"
    );
}

#[test]
fn care_with_identity_covariance_is_plain_svd() {
    let mut rng = Rng::new(2);
    let (dim, out) = (12, 7);
    let W = matrix(&mut rng, out, dim);
    let stats = InputStats {
        second_moment: Mat::identity(dim, dim),
        abs_mean: None,
        tokens: 1,
    };
    for r in 1..=out {
        let plain = reconstruct(Method::PlainSvd, &W, &stats, &NO_DAMPING, r);
        for method in [
            care(SquareRoot::Symmetric),
            care(SquareRoot::Cholesky),
            Method::SvdLlm,
        ] {
            let ours = reconstruct(method, &W, &stats, &FactorOptions::default(), r);
            let diff = fro((&ours - &plain).as_ref());
            assert!(
                diff <= tol(fro(W.as_ref()), out * dim),
                "{} r={r}: ‖Ŵ − Ŵ_svd‖ = {diff:e}",
                method.name()
            );
        }
    }
}

#[test]
fn svd_llm_and_care_share_the_optimum() {
    let mut rng = Rng::new(3);
    let (n, dim, out) = (120, 14, 9);
    let X = planted_samples(&mut rng, n, dim);
    let W = matrix(&mut rng, out, dim);
    let stats = InputStats::from_samples(X.as_ref());
    let t = tol(fro(W.as_ref()), out * dim);
    let damped = FactorOptions { damping: 0.01 };
    for r in [1, 4, 8] {
        let care0 = reconstruct(care(SquareRoot::Symmetric), &W, &stats, &NO_DAMPING, r);
        let llm0 = reconstruct(Method::SvdLlm, &W, &stats, &NO_DAMPING, r);
        let diff0 = fro((&care0 - &llm0).as_ref());
        assert!(
            diff0 <= t,
            "r={r}: δ=0, ‖Ŵ_care − Ŵ_svdllm‖ = {diff0:e} > {t:e}"
        );

        // Same damping: still the same C_δ, hence the same Ŵ.
        let care_d = reconstruct(care(SquareRoot::Symmetric), &W, &stats, &damped, r);
        let llm_d = reconstruct(Method::SvdLlm, &W, &stats, &damped, r);
        assert!(
            fro((&care_d - &llm_d).as_ref()) <= t,
            "r={r}: same δ must agree"
        );

        // CARE damped vs undamped SVD-LLM: the damping moves Ŵ; report how much.
        let moved = fro((&care_d - &llm0).as_ref()) / fro(W.as_ref());
        let (e_care, e_llm) = (output_error(&X, &W, &care_d), output_error(&X, &W, &llm0));
        eprintln!(
            "r={r}: CARE(δ=0.01) vs SVD-LLM(δ=0): ‖ΔŴ‖/‖W‖ = {moved:.3e}, output error {e_care:.6} vs {e_llm:.6} (+{:.3}%)",
            100.0 * (e_care / e_llm - 1.0)
        );
        assert!(
            moved > 1e3 * t / fro(W.as_ref()),
            "r={r}: damping should change Ŵ"
        );
        assert!(
            e_care >= e_llm - tol(e_llm, n * dim),
            "r={r}: undamped is optimal"
        );
    }
}

#[test]
fn every_method_reconstructs_exactly_at_full_rank() {
    let mut rng = Rng::new(4);
    let (n, dim, out) = (80, 10, 6);
    let X = planted_samples(&mut rng, n, dim);
    let W = matrix(&mut rng, out, dim);
    let stats = InputStats::from_samples(X.as_ref());
    for method in [
        care(SquareRoot::Symmetric),
        care(SquareRoot::Cholesky),
        Method::CareCBased,
        Method::PlainSvd,
        Method::Asvd { alpha: 0.5 },
        Method::SvdLlm,
        Method::Mha2MlaJoint,
    ] {
        let d = decompose(method, W.as_ref(), &stats, &FactorOptions::default()).unwrap();
        assert!(
            d.spectrum().windows(2).all(|p| p[0] >= p[1]),
            "{}: spectrum not nonincreasing",
            method.name()
        );
        assert_eq!(d.numerical_rank(), out);
        let f = d.truncate(out).unwrap();
        assert_eq!(
            (f.a.nrows(), f.a.ncols(), f.b.nrows(), f.b.ncols()),
            (out, dim, out, out)
        );
        let diff = fro((&f.reconstruct() - &W).as_ref());
        assert!(
            diff <= tol(fro(W.as_ref()), out * dim),
            "{}: full-rank ‖Ŵ − W‖ = {diff:e}",
            method.name()
        );
        let gram = f.b.transpose() * &f.b;
        let ortho = fro((&gram - Mat::<f64>::identity(out, out)).as_ref());
        assert!(
            ortho <= tol(1.0, out * out),
            "{}: b columns not orthonormal ({ortho:e})",
            method.name()
        );
    }
}

#[test]
fn non_finite_inputs_are_errors_naming_the_input() {
    let mut rng = Rng::new(5);
    let X = planted_samples(&mut rng, 40, 6);
    let mut W = matrix(&mut rng, 4, 6);
    let stats = InputStats::from_samples(X.as_ref());
    W[(2, 3)] = f64::NAN;
    let err = decompose(Method::PlainSvd, W.as_ref(), &stats, &NO_DAMPING).unwrap_err();
    assert!(
        matches!(
            err,
            FactorError::NonFinite {
                what: "weight",
                row: 2,
                col: 3,
                ..
            }
        ),
        "{err}"
    );
    W[(2, 3)] = 1.0;

    let mut bad = stats.clone();
    bad.second_moment[(1, 4)] = f64::INFINITY;
    let err = decompose(care(SquareRoot::Symmetric), W.as_ref(), &bad, &NO_DAMPING).unwrap_err();
    assert!(
        matches!(
            err,
            FactorError::NonFinite {
                what: "second moment",
                row: 1,
                col: 4,
                ..
            }
        ),
        "{err}"
    );

    let mut bad = stats.clone();
    bad.abs_mean.as_mut().unwrap()[5] = f64::NAN;
    let err = decompose(Method::Asvd { alpha: 0.5 }, W.as_ref(), &bad, &NO_DAMPING).unwrap_err();
    assert!(
        matches!(
            err,
            FactorError::NonFinite {
                what: "abs_mean",
                row: 5,
                ..
            }
        ),
        "{err}"
    );

    let mut bad = stats.clone();
    bad.abs_mean = None;
    let err = decompose(Method::Asvd { alpha: 0.5 }, W.as_ref(), &bad, &NO_DAMPING).unwrap_err();
    assert!(matches!(err, FactorError::MissingAbsMean), "{err}");

    let err = decompose(
        Method::PlainSvd,
        W.as_ref(),
        &stats,
        &FactorOptions { damping: -1.0 },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            FactorError::InvalidOption {
                name: "damping",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn ranks_beyond_the_numerical_rank_are_errors() {
    let mut rng = Rng::new(6);
    let X = planted_samples(&mut rng, 40, 8);
    let stats = InputStats::from_samples(X.as_ref());
    // Rank 2 by construction.
    let W = &matrix(&mut rng, 5, 2) * &matrix(&mut rng, 2, 8);
    let d = decompose(
        care(SquareRoot::Symmetric),
        W.as_ref(),
        &stats,
        &FactorOptions::default(),
    )
    .unwrap();
    assert_eq!(
        (d.numerical_rank(), d.max_rank(), d.usable_spectrum().len()),
        (2, 5, 2)
    );
    assert!(d.truncate(2).is_ok());
    for r in [0, 3, 5, 6] {
        let err = d.truncate(r).unwrap_err();
        assert!(
            matches!(err, FactorError::RankOutOfRange { requested, numerical_rank: 2, max_rank: 5 } if requested == r),
            "{err}"
        );
    }
}

#[test]
fn singular_covariance_needs_damping_and_reports_it() {
    let mut rng = Rng::new(7);
    let (dim, out) = (10, 4);
    // Input dimension 3 is never active: C has an exactly zero row and column.
    let mut X = planted_samples(&mut rng, 50, dim);
    for t in 0..X.nrows() {
        X[(t, 3)] = 0.0;
    }
    let stats = InputStats::from_samples(X.as_ref());
    let W = matrix(&mut rng, out, dim);
    let err = decompose(care(SquareRoot::Symmetric), W.as_ref(), &stats, &NO_DAMPING).unwrap_err();
    assert!(
        matches!(err, FactorError::SingularCovariance { .. }),
        "{err}"
    );
    let err = decompose(care(SquareRoot::Cholesky), W.as_ref(), &stats, &NO_DAMPING).unwrap_err();
    assert!(
        matches!(err, FactorError::NotPositiveDefinite { .. }),
        "{err}"
    );
    let err = decompose(Method::CareCBased, W.as_ref(), &stats, &NO_DAMPING).unwrap_err();
    assert!(
        matches!(err, FactorError::SingularCovariance { .. }),
        "{err}"
    );

    let mean_diagonal = (0..dim).map(|i| stats.second_moment[(i, i)]).sum::<f64>() / dim as f64;
    for method in [
        care(SquareRoot::Symmetric),
        care(SquareRoot::Cholesky),
        Method::CareCBased,
    ] {
        let d = decompose(method, W.as_ref(), &stats, &FactorOptions::default()).unwrap();
        let added = d.rescues().damping_added;
        assert!(
            (added - DEFAULT_DAMPING * mean_diagonal).abs() <= 1e-12 * added,
            "{}: damping {added}",
            method.name()
        );
        let diff = fro((&d.truncate(out).unwrap().reconstruct() - &W).as_ref());
        assert!(
            diff <= tol(fro(W.as_ref()), out * dim),
            "{}: damped full-rank ‖Ŵ − W‖ = {diff:e}",
            method.name()
        );
    }
    // SVD-LLM's own rescue: shift and retry, reported.
    let d = decompose(Method::SvdLlm, W.as_ref(), &stats, &NO_DAMPING).unwrap();
    assert!(d.rescues().cholesky_shift > 0.0 && d.rescues().any_beyond_damping());

    let empty = InputStats {
        second_moment: Mat::zeros(dim, dim),
        abs_mean: None,
        tokens: 0,
    };
    let err = decompose(
        care(SquareRoot::Symmetric),
        W.as_ref(),
        &empty,
        &FactorOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, FactorError::EmptyStats { tokens: 0, .. }),
        "{err}"
    );
}

#[test]
fn joint_factorization_shares_the_latent() {
    let mut rng = Rng::new(8);
    let (n, dim, out_k, out_v) = (90, 10, 6, 5);
    let X = planted_samples(&mut rng, n, dim);
    let (W_k, W_v) = (matrix(&mut rng, out_k, dim), matrix(&mut rng, out_v, dim));
    let stats = InputStats::from_samples(X.as_ref());
    let scale = fro(W_k.as_ref()) + fro(W_v.as_ref());
    let full = dim; // min(out_k + out_v, in)
    let joints = [
        decompose_joint(
            care(SquareRoot::Symmetric),
            &[W_k.as_ref(), W_v.as_ref()],
            &stats,
            &FactorOptions::default(),
        )
        .unwrap(),
        decompose_joint(
            Method::PlainSvd,
            &[W_k.as_ref(), W_v.as_ref()],
            &stats,
            &NO_DAMPING,
        )
        .unwrap(),
        mha2mla_joint(W_k.as_ref(), W_v.as_ref()).unwrap(),
    ];
    for joint in &joints {
        assert_eq!(joint.block_rows(), &[out_k, out_v]);
        let f = joint.truncate(full).unwrap();
        assert_eq!((f.a.nrows(), f.a.ncols(), f.b.len()), (full, dim, 2));
        let [k_hat, v_hat]: [Mat<f64>; 2] = f.reconstruct().try_into().unwrap();
        let diff = fro((&k_hat - &W_k).as_ref()) + fro((&v_hat - &W_v).as_ref());
        assert!(
            diff <= tol(scale, (out_k + out_v) * dim),
            "{}: full-rank joint error {diff:e}",
            joint.stacked().method().name()
        );
    }
    // MHA2MLA is exactly the plain joint SVD.
    let (p, m) = (
        joints[1].truncate(4).unwrap(),
        joints[2].truncate(4).unwrap(),
    );
    let diff = fro((&p.b[0] * &p.a - &m.b[0] * &m.a).as_ref());
    assert!(
        diff <= tol(scale, out_k * dim),
        "mha2mla vs plain joint: {diff:e}"
    );

    // Joint CARE reaches the Eckart–Young optimum of the stacked outputs X[W_K; W_V]ᵀ.
    let stacked = Mat::from_fn(out_k + out_v, dim, |i, j| {
        if i < out_k {
            W_k[(i, j)]
        } else {
            W_v[(i - out_k, j)]
        }
    });
    let sigma_Y = (&X * stacked.transpose()).singular_values().unwrap();
    let joint0 = decompose_joint(
        care(SquareRoot::Cholesky),
        &[W_k.as_ref(), W_v.as_ref()],
        &stats,
        &NO_DAMPING,
    )
    .unwrap();
    for r in 1..full {
        let f = joint0.truncate(r).unwrap();
        let k_err = output_error(&X, &W_k, &(&f.b[0] * &f.a));
        let v_err = output_error(&X, &W_v, &(&f.b[1] * &f.a));
        let optimum = sigma_Y[r..].iter().map(|s| s * s).sum::<f64>().sqrt();
        let e = (k_err * k_err + v_err * v_err).sqrt();
        assert!(
            (e - optimum).abs() <= tol(optimum.max(1.0), n * dim),
            "r={r}: joint {e} vs optimum {optimum}"
        );
    }

    let err = decompose_joint(Method::PlainSvd, &[], &stats, &NO_DAMPING).unwrap_err();
    assert!(matches!(err, FactorError::NoWeights));
    let wrong = matrix(&mut rng, 3, dim + 1);
    let err = mha2mla_joint(W_k.as_ref(), wrong.as_ref()).unwrap_err();
    assert!(matches!(err, FactorError::Shape { .. }), "{err}");
}
