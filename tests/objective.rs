//! The local-objective seam: an objective written outside sgr-core, trained through the public
//! API with and without SGR.

use candle_core::{DType, Device, Tensor};
use sgr_core::ctx::Ctx;
use sgr_core::method::Method;
use sgr_core::nn::{global_avg_pool, Init, Layer, Linear, Param};
use sgr_core::objective::{Batch, LocalObjective, ObjectiveOutput};
use sgr_core::optim::{OptimizerConfig, Schedule};
use sgr_core::sgr::{Distance, SgrConfig};
use sgr_core::trainer::{Trainer, TrainerConfig};
use sgr_integration_tests::{abs_sum, labels, randn, resnet};
use sgr_models::HeadKind;

/// Squared error between a linear head's outputs and the one-hot labels: not cross-entropy, and
/// with its own parameters.
#[derive(Debug)]
struct OneHotRegression {
    fc: Linear,
}

impl LocalObjective for OneHotRegression {
    fn params(&self) -> Vec<Param> {
        self.fc.params()
    }

    fn loss(&self, h: &Tensor, batch: &Batch, _ctx: &mut Ctx) -> sgr_core::Result<ObjectiveOutput> {
        let out = self.fc.forward(&global_avg_pool(h)?)?;
        let y = batch.targets.labels().expect("labels");
        let target = sgr_core::loss::one_hot(y, out.dim(1)?, out.dtype())?;
        let loss = (&out - &target)?.sqr()?.mean_all()?;
        Ok(ObjectiveOutput {
            loss,
            logits: Some(out),
        })
    }
}

fn trainer(method: Method) -> Trainer {
    let mut net = resnet(8, 3, 3, HeadKind::ZeroConvOneFc, 4, DType::F32);
    let mut init = Init::new(7, &Device::Cpu, DType::F32);
    for (k, channels) in [(0, 16), (1, 32)] {
        let fc = Linear::new(format!("toy.{k}.fc"), &mut init, channels, 10).unwrap();
        net.set_objective(k, Box::new(OneHotRegression { fc }))
            .unwrap();
    }
    let cfg = TrainerConfig {
        method,
        optimizer: OptimizerConfig::default(),
        lr: 0.05,
        schedule: Schedule::Constant,
        epochs: 1,
        steps_per_epoch: 10,
        seed: 0,
        ..Default::default()
    };
    Trainer::new(net, cfg).unwrap()
}

#[test]
fn an_objective_from_outside_the_crate_trains_with_and_without_sgr() {
    let batch = Batch::labelled(randn(&[16, 3, 8, 8], 1.0, 1, DType::F32), labels(16, 2));
    let sgr = SgrConfig {
        lambda: 1.0,
        distance: Distance::Cosine,
        ..SgrConfig::default()
    };
    let mut finals = Vec::new();
    for method in [Method::greedy(), Method::sgr(sgr)] {
        let mut t = trainer(method.clone());
        let names: Vec<String> = t
            .network()
            .module_params(1)
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert!(names.contains(&"toy.1.fc.weight".to_string()), "{names:?}");
        assert!(
            !names.iter().any(|n| n.starts_with("aux.")),
            "the replaced head is gone"
        );
        let before: Vec<Tensor> = t
            .network()
            .params()
            .iter()
            .map(|p| p.var.as_tensor().copy().unwrap())
            .collect();
        let first = t.train_step(&batch).unwrap().losses().unwrap();
        for _ in 0..6 {
            t.train_step(&batch).unwrap();
        }
        let last = t.train_step(&batch).unwrap().losses().unwrap();
        for k in 0..3 {
            assert!(
                last[k] < first[k],
                "{method}: module {k} loss {} -> {}",
                first[k],
                last[k]
            );
        }
        // Every trainable tensor moved: the toy heads received gradients.
        for (p, b) in t.network().params().iter().zip(&before) {
            if p.kind == sgr_core::nn::ParamKind::Trainable {
                let d = abs_sum(&(p.var.as_tensor() - b).unwrap());
                assert!(d > 0.0, "{method}: `{}` did not move", p.name);
            }
        }
        let m = t.finish_epoch(&mut sgr_core::events::NoObserver).unwrap();
        assert_eq!(
            m.boundaries.iter().all(|b| b.sgr_distance.is_some()),
            method.sgr.is_some(),
            "{method}: the SGR term is computed exactly when it is on"
        );
        // Module 2's first convolution: modules 2 and 3 carry the term (module 1 has none).
        let p = t.network().module_params(1).remove(0);
        finals.push(p.var.as_tensor().copy().unwrap());
    }
    let d = abs_sum(&(&finals[0] - &finals[1]).unwrap());
    assert!(d > 0.0, "SGR changed nothing in module 2");
}
