//! Command-line flags shared by several commands, and their overlay onto a [`RunSpec`]. Every
//! flag is optional: what is not given keeps the value of the spec it is applied to (the
//! defaults, a `--config` file, or a resumed run's `config.json`).

use anyhow::{bail, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::Args;
use sgr_core::method::Method;
use sgr_core::names::Named;
use sgr_models::{HeadKind, SplitStrategy};
use sgr_run::RunSpec;

/// A clap parser for a library enum: its names as the possible values.
pub fn named<T: Named + Clone + Send + Sync + std::str::FromStr>(
) -> impl TypedValueParser<Value = T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    PossibleValuesParser::new(T::names()).try_map(|s| s.parse::<T>())
}

/// Method, split, head and SGR flags, shared by `train`, `bench` and `inspect`.
#[derive(Args, Debug, Clone, Default)]
pub struct MethodArgs {
    /// Training method, OBJECTIVE[+sgr]: bp, greedy, dgl, infopro, infopro-contrast, each but
    /// bp with +sgr (sgr = greedy+sgr) [default: sgr]
    #[arg(long)]
    pub method: Option<Method>,
    /// How each module estimates its gradient: backprop (local BP), or without
    /// back-propagation forward-weight or forward-activity (LocalMixer models, greedy and
    /// greedy+sgr) [default: backprop]
    #[arg(long, value_parser = named::<sgr_core::method::Estimator>())]
    pub estimator: Option<sgr_core::method::Estimator>,
    /// Draws a forward estimator averages per module and step [default: 1]
    #[arg(long, value_name = "M")]
    pub fg_passes: Option<usize>,
    /// Number of gradient-isolated modules K [default: 1 for bp, 4 otherwise]
    #[arg(long = "modules", short = 'k')]
    pub modules: Option<usize>,
    /// How to cut the network into modules (balanced: measured, minimising the largest
    /// module's training memory) [default: auto]
    #[arg(long, value_parser = named::<SplitStrategy>())]
    pub split: Option<SplitStrategy>,
    /// Auxiliary head of modules 1..K-1 (auto: 1c2f for CIFAR ResNets, infopro for ImageNet
    /// ResNets, token for Transformers) [default: auto]
    #[arg(long, value_parser = named::<HeadKind>())]
    pub aux_head: Option<HeadKind>,
    /// SGR weight lambda [default: 1]
    #[arg(long)]
    pub sgr_lambda: Option<f64>,
    /// SGR distance [default: squared-l2]
    #[arg(long, value_parser = named::<sgr_core::sgr::Distance>())]
    pub sgr_distance: Option<sgr_core::sgr::Distance>,
    /// How the SGR parameter gradient is computed [default: finite-difference]
    #[arg(long, value_parser = named::<sgr_core::sgr::SgrGrad>())]
    pub sgr_grad: Option<sgr_core::sgr::SgrGrad>,
    /// Which gradient of a boundary SGR pulls toward the other [default: forward]
    #[arg(long, value_parser = named::<sgr_core::sgr::Direction>())]
    pub sgr_direction: Option<sgr_core::sgr::Direction>,
    /// Epochs over which lambda rises linearly from 0 [default: 0]
    #[arg(long)]
    pub sgr_warmup: Option<f64>,
    /// Finite-difference step [default: 5e-3 central, 1e-3 one-sided]
    #[arg(long)]
    pub sgr_fd_epsilon: Option<f64>,
    /// InfoPro's reconstruction weight λ1 at the first and the last local module, "FIRST,LAST"
    /// (linear in between) [default: 5,0.2]
    #[arg(long, value_name = "FIRST,LAST", value_parser = weight_pair)]
    pub infopro_recon: Option<(f64, f64)>,
    /// InfoPro's task weight λ2 (cross-entropy or contrastive) at the first and the last local
    /// module, "FIRST,LAST" [default: 0.05,0.5]
    #[arg(long, value_name = "FIRST,LAST", value_parser = weight_pair)]
    pub infopro_task: Option<(f64, f64)>,
    /// Temperature of infopro-contrast's supervised contrastive loss [default: 0.07]
    #[arg(long)]
    pub contrast_temperature: Option<f64>,
}

/// `A,B` (two weights) or `A` (the same at both ends).
fn weight_pair(s: &str) -> std::result::Result<(f64, f64), String> {
    let num = |x: &str| {
        x.trim()
            .parse::<f64>()
            .map_err(|_| format!("`{s}`: expected FIRST,LAST weights such as 5,0.2"))
    };
    match s.split(',').collect::<Vec<_>>().as_slice() {
        [a] => num(a).map(|a| (a, a)),
        [a, b] => Ok((num(a)?, num(b)?)),
        _ => Err(format!("`{s}`: expected FIRST,LAST weights such as 5,0.2")),
    }
}

/// Sets `slot` to the flag's value when it was given, and notes the flag.
pub fn set<T: Clone>(
    given: &mut Vec<&'static str>,
    flag: &'static str,
    value: &Option<T>,
    slot: &mut T,
) {
    if let Some(v) = value {
        *slot = v.clone();
        given.push(flag);
    }
}

impl MethodArgs {
    /// Applies the given flags to `spec`; returns the flags applied.
    pub fn apply(&self, spec: &mut RunSpec) -> Result<Vec<&'static str>> {
        let mut given = Vec::new();
        if let Some(m) = &self.method {
            // A new method keeps SGR settings already in the spec.
            let mut m = m.clone();
            if m.sgr.is_some() {
                if let Some(old) = spec.trainer.method.sgr.take() {
                    m.sgr = Some(old);
                }
            }
            // ... and the estimator.
            m.estimator = spec.trainer.method.estimator;
            spec.trainer.method = m;
            given.push("--method");
        }
        if let Some(e) = self.estimator {
            spec.trainer.method.estimator = e;
            given.push("--estimator");
        }
        if let Some(m) = self.fg_passes {
            if !spec.trainer.method.estimator.is_bp_free() {
                bail!(
                    "--fg-passes needs a forward estimator (--estimator forward-activity or \
                     forward-weight); the estimator is `{}`",
                    spec.trainer.method.estimator
                );
            }
            spec.trainer.fg_passes = m;
            given.push("--fg-passes");
        }
        if let Some(k) = self.modules {
            spec.modules = Some(k);
            given.push("--modules");
        }
        set(&mut given, "--split", &self.split, &mut spec.split);
        set(&mut given, "--aux-head", &self.aux_head, &mut spec.aux_head);
        let infopro_flags = [
            ("--infopro-recon", self.infopro_recon.is_some()),
            ("--infopro-task", self.infopro_task.is_some()),
            (
                "--contrast-temperature",
                self.contrast_temperature.is_some(),
            ),
        ];
        if let Some((flag, _)) = infopro_flags.iter().find(|(_, g)| *g) {
            let m = &spec.trainer.method;
            if !m.objective.is_infopro() {
                bail!("{flag} needs an InfoPro method (--method infopro, infopro-contrast, or either with +sgr); the method is `{m}`");
            }
            if *flag == "--contrast-temperature"
                && m.objective != sgr_core::method::Objective::InfoproContrast
            {
                bail!("--contrast-temperature needs --method infopro-contrast[+sgr]; the method is `{m}`");
            }
        }
        let ip = &mut spec.infopro;
        if let Some((a, b)) = self.infopro_recon {
            (ip.recon_first, ip.recon_last) = (a, b);
            given.push("--infopro-recon");
        }
        if let Some((a, b)) = self.infopro_task {
            (ip.task_first, ip.task_last) = (a, b);
            given.push("--infopro-task");
        }
        if let Some(t) = self.contrast_temperature {
            ip.temperature = t;
            given.push("--contrast-temperature");
        }
        let sgr_flags: [(&'static str, bool); 6] = [
            ("--sgr-lambda", self.sgr_lambda.is_some()),
            ("--sgr-distance", self.sgr_distance.is_some()),
            ("--sgr-grad", self.sgr_grad.is_some()),
            ("--sgr-direction", self.sgr_direction.is_some()),
            ("--sgr-warmup", self.sgr_warmup.is_some()),
            ("--sgr-fd-epsilon", self.sgr_fd_epsilon.is_some()),
        ];
        let method = spec.trainer.method.to_string();
        let Some(sgr) = spec.trainer.method.sgr.as_mut() else {
            if let Some((flag, _)) = sgr_flags.iter().find(|(_, g)| *g) {
                bail!(
                    "{flag} needs a method with SGR (e.g. --method sgr); the method is `{method}`"
                );
            }
            return Ok(given);
        };
        set(
            &mut given,
            "--sgr-lambda",
            &self.sgr_lambda,
            &mut sgr.lambda,
        );
        set(
            &mut given,
            "--sgr-distance",
            &self.sgr_distance,
            &mut sgr.distance,
        );
        set(&mut given, "--sgr-grad", &self.sgr_grad, &mut sgr.grad);
        set(
            &mut given,
            "--sgr-direction",
            &self.sgr_direction,
            &mut sgr.direction,
        );
        set(
            &mut given,
            "--sgr-warmup",
            &self.sgr_warmup,
            &mut sgr.warmup_epochs,
        );
        if self.sgr_fd_epsilon.is_some() {
            sgr.fd_epsilon = self.sgr_fd_epsilon;
            given.push("--sgr-fd-epsilon");
        }
        Ok(given)
    }

    /// The defaults with these flags applied, resolved (for `bench` and `inspect`).
    pub fn spec(&self, model: &str) -> Result<RunSpec> {
        let mut spec = RunSpec {
            model: model.to_string(),
            ..RunSpec::default()
        };
        self.apply(&mut spec)?;
        Ok(spec.resolved()?)
    }
}

/// The shape of the random inputs of `bench` and `inspect`.
#[derive(Args, Debug, Clone)]
pub struct InputArgs {
    /// Input height and width.
    #[arg(long = "input-size", default_value_t = 32)]
    pub size: usize,
    /// Input channels.
    #[arg(long = "in-channels", default_value_t = 3)]
    pub channels: usize,
    /// Classes.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
}

impl InputArgs {
    /// The shape as the zoo takes it.
    pub fn input(&self) -> sgr_models::Input {
        sgr_models::Input {
            channels: self.channels,
            classes: self.classes,
            size: self.size,
        }
    }

    /// Checks the shape, so that the random inputs' allocation stays bounded.
    pub fn check(&self, batch: usize) -> Result<()> {
        use sgr_run::spec::{MAX_BATCH, MAX_IMAGE_SIZE};
        let within = |flag: &str, v: usize, lo: usize, hi: usize| {
            if v < lo || v > hi {
                bail!("{flag} must be in {lo}..={hi}, got {v}");
            }
            Ok(())
        };
        within("--batch-size", batch, 1, MAX_BATCH)?;
        within("--input-size", self.size, 1, MAX_IMAGE_SIZE)?;
        within("--in-channels", self.channels, 1, 1024)?;
        within("--classes", self.classes, 2, 1 << 20)
    }
}
