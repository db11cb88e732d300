//! The baselines' local objectives (InfoPro with cross-entropy or the supervised contrastive
//! loss, DGL's MLP-SR head) and their building blocks (BCE of logits, SupCon, bilinear
//! resizing) against an independent PyTorch reference.
//!
//! The fixtures (tests/fixtures/baselines/*.safetensors, written by
//! scripts/fixtures_baselines.py) hold float32 weights under our parameter names, a float32
//! feature map `h`, image and labels, and PyTorch's float64 loss, dL/dh, dL/dθ for every
//! trainable tensor, the Hessian-vector product d/dh <dL/dh, v>, and the BatchNorm buffers after
//! the training-mode forward. Each objective is built with the crate's own constructors
//! (`head_objectives` from `ModelOptions`), loaded with the fixture's weights, and evaluated in
//! f32 (against the f64 reference, within 3e-6 + 3e-5·|reference|) and in f64 (the same f32
//! weights cast, within 1e-12 + 1e-11·|reference|), by the fused BatchNorm path (plain backward)
//! and by the primitive one (inside `autograd::with_second_order`, which also gives the
//! Hessian-vector product).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use sgr_core::autograd;
use sgr_core::ctx::Ctx;
use sgr_core::loss::{binary_cross_entropy_with_logits, l2_normalize_rows, supervised_contrastive};
use sgr_core::method::Objective;
use sgr_core::network::{SplitPlan, Stage};
use sgr_core::nn::upsample::upsample_bilinear;
use sgr_core::nn::ParamKind;
use sgr_core::objective::{Batch, InfoproConfig, LocalObjective, PixelStats};
use sgr_integration_tests::{flat, load_state_dict};
use sgr_models::heads::{head_objectives, DglHead, Head1c2f};
use sgr_models::ModelOptions;

const DEV: Device = Device::Cpu;

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/baselines")
        .join(format!("{name}.safetensors"))
}

/// The fixture's tensors and the configuration recorded in its metadata.
fn fixture(name: &str) -> (HashMap<String, Tensor>, serde_json::Value) {
    let path = fixture_path(name);
    let bytes = std::fs::read(&path).expect("fixture");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let meta = meta.metadata().clone().expect("metadata");
    assert!(meta["torch"].starts_with("2."), "{meta:?}");
    let cfg: serde_json::Value = serde_json::from_str(&meta["config"]).expect("config");
    let map = sgr_core::checkpoint::load_tensors(&path, &DEV).expect("tensors");
    (map, cfg)
}

/// Tolerance |a − b| ≤ abs + rel·|b|, element-wise.
#[derive(Debug, Clone, Copy)]
struct Tol {
    abs: f64,
    rel: f64,
}

/// f32 against the f64 reference: the worst check uses about a quarter of it (the
/// contrastive objective, whose 1/τ = 14 amplifies rounding).
const TOL_F32: Tol = Tol {
    abs: 3e-6,
    rel: 3e-5,
};
/// f64 against the f64 reference: the worst check uses about a fortieth of it.
const TOL_F64: Tol = Tol {
    abs: 1e-12,
    rel: 1e-11,
};

fn tol(dtype: DType) -> Tol {
    match dtype {
        DType::F64 => TOL_F64,
        _ => TOL_F32,
    }
}

/// The worst element of one comparison.
#[derive(Debug, Clone, Default)]
struct Worst {
    /// max |a − b|
    abs: f64,
    /// max |a − b| / |b| over the elements with |b| ≥ 1e-3 · max |b| (of tensors with
    /// max |b| > 1e-9)
    rel: f64,
    /// max |a − b| / (abs + rel·|b|): ≤ 1 passes
    used: f64,
    /// what `used` was worst for
    what: String,
}

/// Collects comparisons; `finish` panics listing every failure.
#[derive(Debug, Default)]
struct Report {
    label: String,
    failures: Vec<String>,
    worst: Worst,
    checks: usize,
}

impl Report {
    fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            ..Self::default()
        }
    }

    fn compare(&mut self, what: &str, got: &Tensor, want: &Tensor, t: Tol) {
        self.checks += 1;
        if got.elem_count() != want.elem_count() {
            self.failures.push(format!(
                "{what}: shape {:?}, the reference has {:?}",
                got.dims(),
                want.dims()
            ));
            return;
        }
        let a = flat(std::slice::from_ref(got));
        let b = flat(std::slice::from_ref(want));
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let (mut abs, mut rel, mut used) = (0.0f64, 0.0f64, 0.0f64);
        let mut at = 0;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let d = (x - y).abs();
            if !d.is_finite() {
                used = f64::INFINITY;
                at = i;
                break;
            }
            abs = abs.max(d);
            // Relative errors of tensors that are 0 in exact arithmetic (the bias of a layer
            // followed by BatchNorm) say nothing; those count under `abs` only.
            if y.abs() >= 1e-3 * scale && scale > 1e-9 {
                rel = rel.max(d / y.abs());
            }
            let u = d / (t.abs + t.rel * y.abs());
            if u > used {
                used = u;
                at = i;
            }
        }
        if used > 1.0 {
            self.failures.push(format!(
                "{what}: element {at}: {} vs reference {} (max abs err {abs:.3e}, max rel err \
                 {rel:.3e}, {used:.2}× the tolerance)",
                a[at], b[at]
            ));
        }
        self.worst.abs = self.worst.abs.max(abs);
        self.worst.rel = self.worst.rel.max(rel);
        if used > self.worst.used {
            self.worst.used = used;
            self.worst.what = what.to_string();
        }
    }

    fn fail(&mut self, problem: String) {
        self.failures.push(problem);
    }

    fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn print(&self) {
        eprintln!(
            "{}: {} checks, max abs err {:.2e}, max rel err {:.2e}, worst {:.2e} of the tolerance \
             ({})",
            self.label,
            self.checks,
            self.worst.abs,
            self.worst.rel,
            self.worst.used,
            self.worst.what
        );
    }

    fn finish(self) {
        self.print();
        assert!(
            self.failures.is_empty(),
            "{}: {} of {} checks differ from PyTorch:\n  {}",
            self.label,
            self.failures.len(),
            self.checks,
            self.failures.join("\n  ")
        );
    }
}

fn num(cfg: &serde_json::Value, key: &str) -> f64 {
    cfg[key]
        .as_f64()
        .unwrap_or_else(|| panic!("config.{key}: {cfg}"))
}

fn floats(cfg: &serde_json::Value, key: &str) -> Vec<f64> {
    cfg[key]
        .as_array()
        .unwrap_or_else(|| panic!("config.{key}: {cfg}"))
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

/// The objective of module 0 of a two-module split, built by `head_objectives` from the
/// options the fixture's configuration gives (`edit` may change them first).
fn build_objective(
    cfg: &serde_json::Value,
    dtype: DType,
    edit: impl FnOnce(&mut ModelOptions),
) -> Box<dyn LocalObjective> {
    let objective = match cfg["objective"].as_str().expect("objective") {
        "infopro" => Objective::Infopro,
        "infopro-contrast" => Objective::InfoproContrast,
        "dgl" => Objective::Dgl,
        other => panic!("objective {other}"),
    };
    let channels = num(cfg, "channels") as usize;
    let classes = num(cfg, "classes") as usize;
    let mut opts = ModelOptions {
        modules: 2,
        objective,
        ..ModelOptions::default()
    };
    if objective != Objective::Dgl {
        let mut ip = InfoproConfig {
            recon_first: num(cfg, "recon_weight"),
            task_first: num(cfg, "task_weight"),
            decoder_width: num(cfg, "decoder_width") as usize,
            ..InfoproConfig::default()
        };
        if objective == Objective::InfoproContrast {
            ip.temperature = num(cfg, "temperature");
            ip.feature_dim = num(cfg, "feature_dim") as usize;
        }
        opts.infopro = ip;
        opts.pixels = Some(PixelStats {
            mean: floats(cfg, "mean"),
            std: floats(cfg, "std"),
        });
    }
    edit(&mut opts);
    let plan = SplitPlan::new(2, vec![0, 1]).expect("plan");
    let channels_of = move |_k: usize| channels;
    let mut objectives = head_objectives(
        &plan,
        &opts,
        (3, classes),
        &DEV,
        dtype,
        Some(&channels_of),
        |_k, prefix, init, outputs| -> sgr_core::Result<Box<dyn Stage>> {
            Ok(match objective {
                Objective::Dgl => Box::new(DglHead::new(prefix, init, channels, outputs, false)?),
                _ => Box::new(Head1c2f::new(prefix, init, channels, outputs)?),
            })
        },
    )
    .expect("objectives");
    assert_eq!(objectives.len(), 2);
    objectives.remove(0)
}

/// The fixed direction of the Hessian-vector product: v[i] = ((37·i) mod 17)/8 − 1 over the
/// row-major flattened tensor (exact in f32).
fn hvp_direction(dims: &[usize], dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|i| ((37 * i) % 17) as f64 / 8.0 - 1.0).collect();
    Tensor::from_vec(v, dims, &DEV)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// What one evaluation of an objective gives.
struct Outcome {
    loss: Tensor,
    logits: Option<Tensor>,
    grad_h: Tensor,
    grads: HashMap<String, Tensor>,
    missing: Vec<String>,
    hvp: Option<Tensor>,
    buffers: HashMap<String, Tensor>,
}

/// Loss, gradients and buffers of one training-mode evaluation of `objective` on the
/// fixture's `h` and batch; `second_order`: inside `autograd::with_second_order` (the primitive
/// BatchNorm), with the Hessian-vector product in h.
fn evaluate(
    objective: &dyn LocalObjective,
    map: &HashMap<String, Tensor>,
    dtype: DType,
    second_order: bool,
) -> Outcome {
    let h = Var::from_tensor(&map["__h__"].to_dtype(dtype).unwrap()).unwrap();
    let input = map["__input__"].to_dtype(dtype).unwrap();
    let labels = map["__labels__"].to_dtype(DType::U32).unwrap();
    let batch = Batch::labelled(input, labels);
    let run = || -> sgr_core::Result<Outcome> {
        let mut ctx = Ctx::train();
        let out = objective.loss(h.as_tensor(), &batch, &mut ctx)?;
        let store = out.loss.backward()?;
        let grad_h = store.get(h.as_tensor()).expect("a gradient for h").clone();
        let mut grads = HashMap::new();
        let mut missing = Vec::new();
        let mut buffers = HashMap::new();
        for p in objective.params() {
            match p.kind {
                ParamKind::Trainable => match store.get(p.var.as_tensor()) {
                    Some(g) => {
                        grads.insert(p.name.clone(), g.detach());
                    }
                    None => missing.push(p.name.clone()),
                },
                ParamKind::Buffer => {
                    buffers.insert(p.name.clone(), p.var.as_tensor().detach());
                }
            }
        }
        let hvp = if second_order {
            assert!(grad_h.track_op(), "second-order gradients keep their graph");
            let v = hvp_direction(h.dims(), dtype);
            let s = grad_h.mul(&v)?.sum_all()?;
            let store2 = s.backward()?;
            Some(
                store2
                    .get(h.as_tensor())
                    .expect("a second-order gradient")
                    .detach(),
            )
        } else {
            None
        };
        Ok(Outcome {
            loss: out.loss.detach(),
            logits: out.logits.map(|l| l.detach()),
            grad_h: grad_h.detach(),
            grads,
            missing,
            hvp,
            buffers,
        })
    };
    if second_order {
        autograd::with_second_order(run).expect("second-order evaluation")
    } else {
        run().expect("evaluation")
    }
}

/// Compares one evaluation with the fixture.
fn compare_outcome(
    report: &mut Report,
    objective: &dyn LocalObjective,
    map: &HashMap<String, Tensor>,
    got: &Outcome,
    t: Tol,
) {
    report.compare("loss", &got.loss, &map["__loss__"], t);
    match (&got.logits, map.get("__logits__")) {
        (Some(a), Some(b)) => report.compare("logits", a, b, t),
        (None, None) => {}
        (a, b) => report.fail(format!(
            "logits: ours {}, the reference's {}",
            a.is_some(),
            b.is_some()
        )),
    }
    report.compare("dL/dh", &got.grad_h, &map["__grad_h__"], t);
    if let Some(hvp) = &got.hvp {
        report.compare("d/dh <dL/dh, v>", hvp, &map["__hvp_h__"], t);
    }
    for name in &got.missing {
        report.fail(format!("{name}: trainable, but no gradient reached it"));
    }
    let mut trainable = Vec::new();
    for p in objective.params() {
        let name = &p.name;
        match p.kind {
            ParamKind::Trainable => {
                trainable.push(name.clone());
                match (got.grads.get(name), map.get(&format!("__grad__.{name}"))) {
                    (Some(a), Some(b)) => report.compare(&format!("dL/d {name}"), a, b, t),
                    (_, None) => report.fail(format!(
                        "{name}: trainable, but the reference has no gradient for it"
                    )),
                    (None, _) => {}
                }
            }
            ParamKind::Buffer => {
                let key = format!("__after__.{name}");
                let want = map.get(&key).unwrap_or_else(|| panic!("{key}"));
                let want = want.to_dtype(DType::F64).unwrap();
                report.compare(&format!("{name} after"), &got.buffers[name], &want, t);
            }
        }
    }
    for key in map.keys().filter(|k| k.starts_with("__grad__.")) {
        let name = &key["__grad__.".len()..];
        if !trainable.iter().any(|n| n == name) {
            report.fail(format!(
                "the reference has a gradient for {name}, not a trainable tensor of ours"
            ));
        }
    }
}

/// Builds the fixture's objective in `dtype`, loads its weights, evaluates and compares
/// (both BatchNorm paths); returns the reports.
fn check_objective(name: &str, dtype: DType, edit: impl Fn(&mut ModelOptions)) -> Vec<Report> {
    let (map, cfg) = fixture(name);
    let mut reports = Vec::new();
    for second_order in [false, true] {
        let objective = build_objective(&cfg, dtype, &edit);
        load_state_dict(&objective.params(), &map);
        let got = evaluate(objective.as_ref(), &map, dtype, second_order);
        let path = if second_order {
            "primitive BN, second order"
        } else {
            "fused BN"
        };
        let mut report = Report::new(format!("{name} {dtype:?} ({path})"));
        compare_outcome(&mut report, objective.as_ref(), &map, &got, tol(dtype));
        reports.push(report);
    }
    reports
}

fn check_objective_fixture(name: &str) {
    for dtype in [DType::F32, DType::F64] {
        for report in check_objective(name, dtype, |_| {}) {
            report.finish();
        }
    }
}

#[test]
fn infopro_with_cross_entropy_matches_pytorch() {
    check_objective_fixture("infopro_ce");
}

#[test]
fn infopro_with_the_contrastive_loss_matches_pytorch() {
    check_objective_fixture("infopro_contrast");
}

#[test]
fn dgl_mlp_sr_head_matches_pytorch() {
    check_objective_fixture("dgl");
}

/// The comparison is sharp enough to see small departures from the reference: each of these
/// changes of the configuration makes some check fail, at the f32 tolerance (fused path).
#[test]
fn perturbed_objectives_do_not_match() {
    type Edit = Box<dyn Fn(&mut ModelOptions)>;
    let cases: Vec<(&str, &str, Edit)> = vec![
        (
            "infopro_contrast",
            "temperature 0.07 → 0.0707",
            Box::new(|o| o.infopro.temperature = 0.0707),
        ),
        (
            "infopro_ce",
            "no pixel statistics (the target is the normalised input, clamped)",
            Box::new(|o| o.pixels = None),
        ),
        (
            "infopro_ce",
            "std of the red channel 1% larger",
            Box::new(|o| {
                if let Some(p) = o.pixels.as_mut() {
                    p.std[0] *= 1.01;
                }
            }),
        ),
        (
            "infopro_ce",
            "λ1 = 5 → 5.001",
            Box::new(|o| o.infopro.recon_first += 0.001),
        ),
        (
            "infopro_contrast",
            "λ2 = 1.5 → 1.5015",
            Box::new(|o| o.infopro.task_first *= 1.001),
        ),
    ];
    for (name, what, edit) in &cases {
        let reports = check_objective(name, DType::F32, edit);
        let report = &reports[0];
        assert!(
            !report.passed(),
            "{name} with {what} still matches the reference"
        );
        eprintln!("{name} with {what}: {} checks fail", report.failures.len());
    }
}

/// BCE of logits, L2 normalisation + SupCon, and bilinear resizing, in f32 and f64.
#[test]
fn loss_functions_and_upsampling_match_pytorch() {
    let (map, cfg) = fixture("functions");
    for dtype in [DType::F32, DType::F64] {
        let t = tol(dtype);
        let mut report = Report::new(format!("functions {dtype:?}"));
        let var = |key: &str| Var::from_tensor(&map[key].to_dtype(dtype).unwrap()).unwrap();

        // BCELoss()(sigmoid(z), t).
        let z = var("__bce.z__");
        let target = map["__bce.t__"].to_dtype(dtype).unwrap();
        let loss = binary_cross_entropy_with_logits(z.as_tensor(), &target).unwrap();
        let g = loss.backward().unwrap();
        report.compare("bce loss", &loss, &map["__bce.loss__"], t);
        report.compare(
            "bce dL/dz",
            g.get(z.as_tensor()).unwrap(),
            &map["__bce.grad__"],
            t,
        );

        // F.normalize, then SupCon with base temperature = temperature.
        let labels = map["__supcon.labels__"].to_dtype(DType::U32).unwrap();
        for tau in floats(&cfg, "supcon_temperatures") {
            let x = var("__supcon.x__");
            let f = l2_normalize_rows(x.as_tensor()).unwrap();
            report.compare("normalized rows", &f, &map["__supcon.normalized__"], t);
            let loss = supervised_contrastive(&f, &labels, tau).unwrap();
            let g = loss.backward().unwrap();
            report.compare(
                &format!("supcon loss τ={tau}"),
                &loss,
                &map[&format!("__supcon.{tau}.loss__")],
                t,
            );
            report.compare(
                &format!("supcon dL/dx τ={tau}"),
                g.get(x.as_tensor()).unwrap(),
                &map[&format!("__supcon.{tau}.grad__")],
                t,
            );
        }

        // F.interpolate(bilinear, align_corners=True) and its adjoint.
        let sizes = cfg["upsample"].as_array().expect("upsample sizes");
        for (i, s) in sizes.iter().enumerate() {
            let s: Vec<usize> = s
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let x = var(&format!("__up.{i}.x__"));
            assert_eq!(&x.dims()[2..], &s[..2]);
            let w = map[&format!("__up.{i}.w__")].to_dtype(dtype).unwrap();
            let y = upsample_bilinear(x.as_tensor(), s[2], s[3]).unwrap();
            let g = y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            let what = format!("{}x{} → {}x{}", s[0], s[1], s[2], s[3]);
            report.compare(
                &format!("upsample {what}"),
                &y,
                &map[&format!("__up.{i}.y__")],
                t,
            );
            report.compare(
                &format!("upsample adjoint {what}"),
                g.get(x.as_tensor()).unwrap(),
                &map[&format!("__up.{i}.grad__")],
                t,
            );
        }
        report.finish();
    }
}
