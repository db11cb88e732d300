//! The BP-free step of a [`Trainer`] (docs/bpfree.md): forward-gradient estimates for the
//! modules with perturbable blocks, exact local gradients for a read-out module, and the
//! boundaries probed along a shared direction, which also gives the SGR term.

use candle_core::Tensor;

use super::{add_boundary_stats, add_scaled, pass_seed, Trainer};
use crate::ctx::Ctx;
use crate::objective::Batch;
use crate::sgr::{
    base_pass_in, boundary_stats_on_device, sgr_term_grad, BasePoint, LocalModule, Site,
};
use crate::Result;

impl Trainer {
    /// A BP-free step (docs/bpfree.md): each module with perturbable layers takes the
    /// forward-gradient estimate of its local loss, a read-out module its exact local gradient;
    /// the boundaries are probed along a shared Gaussian direction, which also gives the SGR
    /// term (forward direction) without back-propagation.
    pub(super) fn forward_step(
        &mut self,
        batch: &Batch,
        lr: f64,
        lambda: f64,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        use crate::forward::{boundary_probe, has_perturbable, module_pass, sgr_term};
        let k_total = self.net.num_modules();
        let estimator = self.cfg.method.estimator;
        let passes = self.cfg.fg_passes;
        let sgr = self.cfg.method.sgr.clone();
        let mut losses = Vec::with_capacity(k_total);
        let mut correct = None;
        let mut h = batch.input.detach();
        let mut prev_a: Option<Tensor> = None;
        for k in 0..k_total {
            let _span = tracing::trace_span!("module", k, estimator = %estimator).entered();
            let seed = pass_seed(self.cfg.seed, self.step, k);
            let (loss, logits, mut grads, output, output_grad, sgr_d);
            if has_perturbable(&self.net, k) {
                let pass = module_pass(
                    &self.net,
                    k,
                    batch,
                    &h,
                    estimator,
                    passes,
                    seed,
                    sgr.is_some() && k > 0,
                )?;
                grads = pass.grads.clone();
                sgr_d = match &prev_a {
                    Some(a) => {
                        let probe = boundary_probe(&self.net, k, &h, a, &pass, seed)?;
                        let stats = probe.stats()?;
                        add_boundary_stats(&mut self.sums, &mut self.acc, k - 1, &stats)?;
                        match &sgr {
                            Some(cfg) => {
                                let term = sgr_term(
                                    &self.net,
                                    k,
                                    batch,
                                    &h,
                                    &probe,
                                    &pass,
                                    estimator,
                                    passes,
                                    cfg.epsilon(),
                                    seed,
                                )?;
                                add_scaled(&mut grads, &term, lambda)?;
                                Some(probe.distance()?)
                            }
                            None => None,
                        }
                    }
                    None => None,
                };
                (loss, logits, output, output_grad) =
                    (pass.loss, pass.logits, pass.output, Some(pass.output_grad));
            } else {
                // A read-out module: exact local gradients, the boundary exact as well.
                let prob = LocalModule {
                    net: &self.net,
                    k,
                    batch,
                };
                let record = sgr.is_some();
                let ctx = if record {
                    Ctx::train_recording()
                } else {
                    Ctx::train()
                };
                let bp = base_pass_in(&prob, &h, k > 0, ctx.with_seed(seed))?;
                grads = bp.grads.clone();
                sgr_d = match (&prev_a, &bp.input_grad) {
                    (Some(a), Some(b)) => {
                        let stats = boundary_stats_on_device(a, b)?;
                        add_boundary_stats(&mut self.sums, &mut self.acc, k - 1, &stats)?;
                        match &sgr {
                            Some(cfg) => {
                                let term = sgr_term_grad(
                                    &prob,
                                    &h,
                                    Site::Input,
                                    b,
                                    a,
                                    BasePoint::of(&bp),
                                    cfg,
                                )?;
                                add_scaled(&mut grads, &term.grads, lambda)?;
                                Some(term.distance)
                            }
                            None => None,
                        }
                    }
                    _ => None,
                };
                (loss, logits, output, output_grad) =
                    (bp.loss, bp.logits, bp.output, bp.output_grad);
            }
            losses.push(loss);
            if k + 1 == k_total {
                if let Some(l) = &logits {
                    correct = Some(batch.targets.correct(l)?);
                }
            }
            if let Some(d) = sgr_d {
                self.sums.add_boundary(k - 1, 2, &d)?;
                self.acc.boundary[k - 1].4 += 1;
            }
            self.update(k, grads, lr)?;
            prev_a = if k + 1 < k_total { output_grad } else { None };
            h = output;
        }
        let correct = match correct {
            Some(c) => c,
            None => Tensor::new(0f64, h.device())?,
        };
        Ok((losses, correct))
    }
}
