//! The SGR parameter gradient against independent oracles:
//! f64 central finite differences of the scalar J_k = L_k + λ·D(s_k(θ), t), and the exact
//! double backward for the finite-difference way on a real ResNet module.

use candle_core::{DType, Tensor, Var};
use sgr_core::sgr::{
    base_pass, sgr_term_grad, BasePoint, Distance, LocalModule, LocalProblem, SgrGrad, Site,
};
use sgr_integration_tests::{
    abs_sum, assert_module_learns, flat, labels, randn, rel_err, resnet, sgr_config, site_grad,
    target_near,
};
use sgr_models::HeadKind;

/// J(θ) = L(θ) + λ·D(s(θ), t), where s is the local gradient at `site`.
fn objective(
    p: &dyn LocalProblem,
    x: &Tensor,
    site: Site,
    t: &Tensor,
    lambda: f64,
    d: Distance,
) -> f64 {
    let bp = base_pass(p, x, true, false).unwrap();
    let s = site_grad(&bp, site);
    let dv = d
        .eval(&s, t)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    bp.loss_value().unwrap() + lambda * dv
}

fn nudge(var: &Var, index: usize, delta: f64) {
    let shape = var.dims().to_vec();
    let mut v = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    v[index] += delta;
    var.set(&Tensor::from_vec(v, shape, var.device()).unwrap())
        .unwrap();
}

/// Test 1: the exact SGR gradient (double backward) of J_k equals f64 central finite
/// differences of J_k, on a conv + BatchNorm + ReLU module (a basic block) with a 1c2f head
/// (conv + BN + ReLU + two linear layers), for every distance and both sites.
#[test]
fn exact_sgr_gradient_equals_f64_finite_differences_of_j() {
    let cases = [
        (Site::Input, Distance::SquaredL2),
        (Site::Input, Distance::Cosine),
        (Site::Input, Distance::CosinePerSample),
        (Site::Output, Distance::SquaredL2),
        (Site::Output, Distance::Cosine),
    ];
    for (ci, (site, distance)) in cases.into_iter().enumerate() {
        let net = resnet(8, 1, 4, HeadKind::OneConvTwoFc, 11, DType::F64);
        let x = randn(&[4, 16, 8, 8], 1.0, 5 + ci as u64, DType::F64)
            .relu()
            .unwrap();
        let y = labels(4, 3);
        let prob = LocalModule {
            net: &net,
            k: 1,
            batch: &sgr_integration_tests::targets(&y),
        };
        let base = base_pass(&prob, &x, true, false).unwrap();
        let s0 = site_grad(&base, site);
        let t = target_near(&s0, 99 + ci as u64);
        // λ makes both parts of J comparable, so the term is really tested.
        let d0 = distance.eval(&s0, &t).unwrap().to_scalar::<f64>().unwrap();
        let lambda = 0.7 * base.loss_value().unwrap() / d0;
        let term = sgr_term_grad(
            &prob,
            &x,
            site,
            &s0,
            &t,
            BasePoint::default(),
            &sgr_config(distance, SgrGrad::Exact),
        )
        .unwrap();
        let exact: Vec<Tensor> = base
            .grads
            .iter()
            .zip(&term.grads)
            .map(|(g, d)| (g + (d * lambda).unwrap()).unwrap())
            .collect();
        let h = 1e-6;
        let (mut fd_all, mut ex_all) = (Vec::new(), Vec::new());
        for (var, g) in prob.vars().iter().zip(&exact) {
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let n = g.len();
            for j in 0..4usize.min(n) {
                let i = (j * 7919 + 13) % n;
                nudge(var, i, h);
                let jp = objective(&prob, &x, site, &t, lambda, distance);
                nudge(var, i, -2.0 * h);
                let jm = objective(&prob, &x, site, &t, lambda, distance);
                nudge(var, i, h);
                fd_all.push((jp - jm) / (2.0 * h));
                ex_all.push(g[i]);
            }
        }
        let err = rel_err(&fd_all, &ex_all);
        eprintln!("{site:?} {distance:?}: exact vs f64 FD of J relative error {err:.2e}");
        assert!(
            err < 1e-6,
            "{site:?} {distance:?}: exact vs f64 FD of J relative error {err:e}"
        );
        // The SGR term itself must matter at this λ (else the test would not test it).
        let plain: Vec<f64> = flat(&base.grads);
        let with_term = flat(&exact);
        assert!(rel_err(&plain, &with_term) > 1e-3, "{site:?} {distance:?}");
    }
}

/// Test 2: the finite-difference SGR gradient (ReLU masks replayed, BatchNorm statistics
/// untouched) equals the exact double backward within 1e-3 relative, in f32, on real ResNet-20
/// modules of three basic blocks, batch 32.
#[test]
fn finite_difference_sgr_gradient_matches_exact_on_resnet_module() {
    // ResNet-20 uniform K=3: module 0 = stem + layer1.0-2, module 1 = layer2.0-2 (downsampling
    // block included), module 2 = layer3.0-2 + classifier.
    let net = resnet(20, 3, 3, HeadKind::OneConvTwoFc, 7, DType::F32);
    let y = labels(32, 1);
    let cases = [
        (
            1usize,
            Site::Input,
            Distance::SquaredL2,
            vec![32, 16, 16, 16],
        ),
        (2, Site::Input, Distance::Cosine, vec![32, 32, 8, 8]),
        (0, Site::Output, Distance::SquaredL2, vec![32, 3, 16, 16]),
        (
            1,
            Site::Output,
            Distance::CosinePerSample,
            vec![32, 16, 16, 16],
        ),
    ];
    for (ci, (k, site, distance, shape)) in cases.into_iter().enumerate() {
        let mut x = randn(&shape, 1.0, 40 + ci as u64, DType::F32);
        if k > 0 {
            x = x.relu().unwrap();
        }
        let prob = LocalModule {
            net: &net,
            k,
            batch: &sgr_integration_tests::targets(&y),
        };
        let base = base_pass(&prob, &x, true, true).unwrap();
        assert!(!base.masks.is_empty());
        let s0 = site_grad(&base, site);
        let t = target_near(&s0, 7 + ci as u64);
        // Every way sees the same ReLU masks: f32 rounding differs between the fused kernels
        // (finite differences) and the primitive BatchNorm (second-order thread), which can flip
        // a pre-activation at ~1e-7.
        let term = |way| {
            let c = sgr_config(distance, way);
            sgr_term_grad(&prob, &x, site, &s0, &t, BasePoint::of(&base), &c).unwrap()
        };
        let ex = term(SgrGrad::Exact);
        // central (O(ε²)) within 1e-3; one-sided against the base pass (O(ε)) within its bound
        for (way, bound) in [
            (SgrGrad::FiniteDifference, 1e-3),
            (SgrGrad::ForwardDifference, ONE_SIDED_BOUND),
        ] {
            let fd = term(way);
            let err = rel_err(&flat(&fd.grads), &flat(&ex.grads));
            eprintln!(
                "module {k} {site:?} {distance:?}: {way:?} vs exact relative error {err:.2e}"
            );
            assert!(
                err < bound,
                "module {k} {site:?} {distance:?}: {way:?} vs exact relative error {err:e}"
            );
            let (fdd, exd) = (
                fd.distance.to_scalar::<f64>().unwrap(),
                ex.distance.to_scalar::<f64>().unwrap(),
            );
            assert!((fdd - exd).abs() <= 1e-4 * exd.abs().max(1e-12));
        }
    }
}

/// Bound on the one-sided difference's relative error: O(ε) truncation, measured 1.7e-3..4.6e-3
/// at its default ε = 1e-3 on these four cases (central: 1.2e-4..2e-4).
const ONE_SIDED_BOUND: f64 = 1e-2;

/// Without the replayed masks the same central difference crosses ReLU kinks; with them it
/// must be clearly better (guards against the replay silently doing nothing).
#[test]
fn replayed_masks_are_what_makes_the_difference_accurate() {
    let net = resnet(20, 3, 3, HeadKind::OneConvTwoFc, 7, DType::F32);
    let y = labels(32, 1);
    let x = randn(&[32, 16, 16, 16], 1.0, 3, DType::F32).relu().unwrap();
    let prob = LocalModule {
        net: &net,
        k: 1,
        batch: &sgr_integration_tests::targets(&y),
    };
    let base = base_pass(&prob, &x, true, true).unwrap();
    let s0 = base.input_grad.clone().unwrap();
    let t = target_near(&s0, 5);
    let c = sgr_config(Distance::SquaredL2, SgrGrad::FiniteDifference);
    let ex = sgr_term_grad(
        &prob,
        &x,
        Site::Input,
        &s0,
        &t,
        BasePoint::default(),
        &sgr_config(Distance::SquaredL2, SgrGrad::Exact),
    )
    .unwrap();
    let replayed =
        sgr_term_grad(&prob, &x, Site::Input, &s0, &t, BasePoint::of(&base), &c).unwrap();
    let e_rep = rel_err(&flat(&replayed.grads), &flat(&ex.grads));
    assert!(e_rep < 1e-3, "replayed masks: {e_rep:e}");
    // Replaying the wrong masks (from another input) must be detected as a large error.
    let other = base_pass(
        &prob,
        &randn(&[32, 16, 16, 16], 1.0, 4, DType::F32).relu().unwrap(),
        true,
        true,
    )
    .unwrap();
    let wrong_base = BasePoint {
        seed: 0,
        masks: &other.masks,
        grads: &base.grads,
    };
    let wrong = sgr_term_grad(&prob, &x, Site::Input, &s0, &t, wrong_base, &c).unwrap();
    let e_wrong = rel_err(&flat(&wrong.grads), &flat(&ex.grads));
    assert!(
        e_wrong > 10.0 * e_rep,
        "wrong masks {e_wrong:e} vs right {e_rep:e}"
    );
}

/// Test 5 (gradient level): every trainable parameter of every module receives a non-zero
/// gradient from its local loss, and from the SGR term in both ways and at both sites; and
/// from end-to-end back-propagation.
#[test]
fn every_trainable_parameter_gets_a_nonzero_gradient() {
    for head in [HeadKind::ZeroConvOneFc, HeadKind::OneConvTwoFc] {
        let net = resnet(8, 3, 4, head, 3, DType::F32);
        let batch = sgr_integration_tests::targets(&labels(8, 2));
        let mut h = randn(&[8, 3, 8, 8], 1.0, 1, DType::F32);
        for k in 0..net.num_modules() {
            let mut sites = vec![Site::Input];
            if k + 1 < net.num_modules() {
                sites.push(Site::Output);
            }
            let ways = [
                SgrGrad::FiniteDifference,
                SgrGrad::ForwardDifference,
                SgrGrad::Exact,
            ];
            let label = format!("{head:?}");
            h = assert_module_learns(&net, k, &batch, &h, &sites, &ways, &label).output;
        }
    }
    // bp: the whole network as one graph.
    let net = resnet(8, 3, 1, HeadKind::OneConvTwoFc, 3, DType::F32);
    let x = randn(&[8, 3, 8, 8], 1.0, 1, DType::F32);
    let y = labels(8, 2);
    let mut ctx = sgr_core::nn::Ctx::train();
    let loss = sgr_core::loss::cross_entropy(&net.forward(&x, &mut ctx).unwrap(), &y).unwrap();
    let store = loss.backward().unwrap();
    for p in net.trainable() {
        let g = store
            .get(p.var.as_tensor())
            .unwrap_or_else(|| panic!("bp: `{}` got no gradient", p.name));
        let s = abs_sum(g);
        assert!(s > 0.0, "bp: `{}` got a zero gradient", p.name);
    }
}

/// ∂D/∂s from autodiff equals the closed form of each distance.
#[test]
fn distance_gradients_match_closed_forms() {
    let s = randn(&[4, 3, 2, 2], 0.1, 1, DType::F64);
    let t = randn(&[4, 3, 2, 2], 0.1, 2, DType::F64);
    let b = 4.0;
    let (d, v) = Distance::SquaredL2.value_and_grad(&s, &t).unwrap();
    let d = d.to_scalar::<f64>().unwrap();
    let diff = (&s - &t).unwrap();
    let want_d = b * diff
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((d - want_d).abs() < 1e-12 * want_d);
    let want_v = (diff * (2.0 * b)).unwrap();
    assert!(rel_err(&flat(std::slice::from_ref(&v)), &flat(&[want_v])) < 1e-12);
    // ... and equals autodiff through `eval` (the form the exact way differentiates twice)
    let sv = Var::from_tensor(&s).unwrap();
    let auto = Distance::SquaredL2.eval(sv.as_tensor(), &t).unwrap();
    let g = auto.backward().unwrap();
    let auto_v = g.get(sv.as_tensor()).unwrap();
    assert!(rel_err(&flat(&[v]), &flat(std::slice::from_ref(auto_v))) < 1e-12);
    assert!((auto.to_scalar::<f64>().unwrap() - d).abs() < 1e-12 * d);
    // cosine: ∂/∂s (1 − s·t/(|s||t|)) = −t/(|s||t|) + (s·t) s/(|s|³|t|)
    let (d, v) = Distance::Cosine.value_and_grad(&s, &t).unwrap();
    let d = d.to_scalar::<f64>().unwrap();
    let sv = flat(std::slice::from_ref(&s));
    let tv = flat(std::slice::from_ref(&t));
    let dot: f64 = sv.iter().zip(&tv).map(|(a, b)| a * b).sum();
    let ns = sv.iter().map(|a| a * a).sum::<f64>().sqrt();
    let nt = tv.iter().map(|a| a * a).sum::<f64>().sqrt();
    assert!((d - (1.0 - dot / (ns * nt))).abs() < 1e-12);
    let want: Vec<f64> = sv
        .iter()
        .zip(&tv)
        .map(|(a, b)| -b / (ns * nt) + dot * a / (ns.powi(3) * nt))
        .collect();
    assert!(rel_err(&flat(&[v]), &want) < 1e-10);
}
