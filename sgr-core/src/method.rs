//! A training method as independent choices: the local objective, SGR on or off, and the
//! gradient estimator inside a module. On the command line and in `config.json` a method is
//! spelled `OBJECTIVE[+sgr]`; `sgr` is the short name of `greedy+sgr`.

use std::fmt;
use std::str::FromStr;

use crate::names::Named;
use crate::sgr::SgrConfig;
use crate::{Error, Result};

/// The built-in local objectives, by the name the model zoo builds them from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Objective {
    /// End-to-end back-propagation: one module, the network's classifier loss.
    Bp,
    /// Greedy SL: cross-entropy on an auxiliary head per module.
    Greedy,
    /// DGL (Belilovsky et al. 2020): cross-entropy on DGL's MLP-SR auxiliary head.
    Dgl,
    /// InfoPro (Wang et al. 2021): reconstruction by a decoder plus cross-entropy on a head.
    Infopro,
    /// InfoPro with a supervised contrastive loss in place of the cross-entropy.
    InfoproContrast,
}

crate::named_enum!(Objective, "objective", {
    "bp" => Bp,
    "greedy" => Greedy,
    "dgl" => Dgl,
    "infopro" => Infopro,
    "infopro-contrast" => InfoproContrast,
});

impl Objective {
    /// Whether the objective trains the whole network as one graph (K = 1).
    pub fn is_end_to_end(&self) -> bool {
        matches!(self, Objective::Bp)
    }

    /// Whether the objective is InfoPro's (a decoder and the [`crate::objective::InfoproConfig`]
    /// weights).
    pub fn is_infopro(&self) -> bool {
        matches!(self, Objective::Infopro | Objective::InfoproContrast)
    }
}

/// How a module estimates the gradient of its local objective (docs/bpfree.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Estimator {
    /// Back-propagation inside the module (local BP; per block with greedy: Ren et al.'s LG-BP).
    #[default]
    Backprop,
    /// Weight perturbation (LG-FG-W): one directional derivative of the local losses along a
    /// Gaussian perturbation of the weights, times that perturbation.
    ForwardWeight,
    /// Activity perturbation (LG-FG-A): Gaussian noise on each layer's normalised
    /// pre-activation, one directional derivative per local-loss copy, the weight gradient
    /// formed from the layer's input.
    ForwardActivity,
}

crate::named_enum!(Estimator, "gradient estimator", {
    "backprop" => Backprop,
    "forward-weight" => ForwardWeight,
    "forward-activity" => ForwardActivity,
});

impl Estimator {
    /// Whether the estimator runs without back-propagation through the module's layers.
    pub fn is_bp_free(&self) -> bool {
        !matches!(self, Estimator::Backprop)
    }
}

/// A training method: objective, SGR term and gradient estimator.
#[derive(Debug, Clone, PartialEq)]
pub struct Method {
    /// The local objective of every module.
    pub objective: Objective,
    /// The SGR term, when on.
    pub sgr: Option<SgrConfig>,
    /// The gradient estimator inside a module.
    pub estimator: Estimator,
}

/// The suffix that turns SGR on.
const SGR_SUFFIX: &str = "+sgr";

impl Method {
    /// End-to-end back-propagation.
    pub fn bp() -> Self {
        Self::plain(Objective::Bp)
    }

    /// Greedy SL.
    pub fn greedy() -> Self {
        Self::plain(Objective::Greedy)
    }

    /// Greedy SL with the SGR term.
    pub fn sgr(cfg: SgrConfig) -> Self {
        Self {
            sgr: Some(cfg),
            ..Self::greedy()
        }
    }

    /// `objective` without SGR, back-propagation inside modules.
    pub fn plain(objective: Objective) -> Self {
        Self {
            objective,
            sgr: None,
            estimator: Estimator::Backprop,
        }
    }

    /// Every valid spelling, for error messages and help.
    pub fn names() -> Vec<String> {
        let mut v = Vec::new();
        for o in Objective::names() {
            v.push(o.to_string());
            if o != "bp" {
                v.push(format!("{o}{SGR_SUFFIX}"));
            }
        }
        v.push("sgr (= greedy+sgr)".into());
        v
    }

    /// Checks the combination and the SGR settings.
    pub fn validate(&self) -> Result<()> {
        self.validate_estimator()?;
        if let Some(s) = &self.sgr {
            if self.objective.is_end_to_end() {
                return Err(Error::InvalidConfig(format!(
                    "`{}{SGR_SUFFIX}`: {} trains end to end and has no module boundaries for \
                     SGR; valid methods: {}",
                    self.objective,
                    self.objective,
                    Self::names().join(", ")
                )));
            }
            s.validate()?;
        }
        Ok(())
    }
}

impl Method {
    /// The BP-free estimators train Greedy SL's local losses (Ren et al.'s LG-FG), with SGR as
    /// docs/bpfree.md builds it: the `squared-l2` distance, the `forward` direction and the
    /// central difference.
    fn validate_estimator(&self) -> Result<()> {
        let e = self.estimator;
        if !e.is_bp_free() {
            return Ok(());
        }
        if self.objective != Objective::Greedy {
            let why = if self.objective.is_end_to_end() {
                "bp back-propagates through the whole network"
            } else {
                "its heads are not trained by the read-out losses the estimators use"
            };
            return Err(Error::InvalidConfig(format!(
                "estimator `{e}` trains the local losses of greedy or greedy+sgr, not `{self}`: \
                 {why}; use --method greedy or greedy+sgr with it, or --estimator backprop"
            )));
        }
        if let Some(s) = &self.sgr {
            let bad = if s.distance != crate::sgr::Distance::SquaredL2 {
                Some(format!(
                    "--sgr-distance {} (supported: squared-l2)",
                    s.distance
                ))
            } else if s.direction != crate::sgr::Direction::Forward {
                Some(format!(
                    "--sgr-direction {} (supported: forward)",
                    s.direction
                ))
            } else if s.grad != crate::sgr::SgrGrad::FiniteDifference {
                Some(format!(
                    "--sgr-grad {} (supported: finite-difference, the central difference)",
                    s.grad
                ))
            } else {
                None
            };
            if let Some(bad) = bad {
                return Err(Error::InvalidConfig(format!(
                    "SGR without back-propagation (estimator `{e}`) does not support {bad}"
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.objective, &self.sgr) {
            (Objective::Greedy, Some(_)) => f.write_str("sgr"),
            (o, Some(_)) => write!(f, "{o}{SGR_SUFFIX}"),
            (o, None) => write!(f, "{o}"),
        }
    }
}

impl FromStr for Method {
    type Err = Error;

    /// `OBJECTIVE[+sgr]` or `sgr`; the SGR settings are the defaults.
    fn from_str(s: &str) -> Result<Self> {
        let unknown = || Error::UnknownName {
            what: "method",
            given: s.to_string(),
            valid: Self::names().join(", "),
        };
        let (base, sgr) = match s.strip_suffix(SGR_SUFFIX) {
            _ if s == "sgr" => ("greedy", true),
            Some(base) => (base, true),
            None => (s, false),
        };
        let objective: Objective = base.parse().map_err(|_| unknown())?;
        let m = Self {
            objective,
            sgr: sgr.then(SgrConfig::default),
            estimator: Estimator::Backprop,
        };
        m.validate()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_round_trips_and_rejects_clearly() {
        for (given, shown) in [
            ("bp", "bp"),
            ("greedy", "greedy"),
            ("sgr", "sgr"),
            ("greedy+sgr", "sgr"),
            ("dgl", "dgl"),
            ("dgl+sgr", "dgl+sgr"),
            ("infopro+sgr", "infopro+sgr"),
            ("infopro-contrast", "infopro-contrast"),
            ("infopro-contrast+sgr", "infopro-contrast+sgr"),
        ] {
            let m: Method = given.parse().unwrap();
            assert_eq!(m.to_string(), shown);
            assert_eq!(m.to_string().parse::<Method>().unwrap(), m);
        }
        assert_eq!(
            "sgr".parse::<Method>().unwrap(),
            Method::sgr(SgrConfig::default())
        );
        let e = "bp+sgr".parse::<Method>().unwrap_err().to_string();
        assert!(e.contains("end to end") && e.contains("greedy+sgr"), "{e}");
        let e = "dgll".parse::<Method>().unwrap_err().to_string();
        assert!(
            e.contains("unknown method `dgll`")
                && e.contains("bp, greedy, greedy+sgr, dgl, dgl+sgr, infopro, infopro+sgr")
                && e.contains("infopro-contrast+sgr"),
            "{e}"
        );
        for bad in ["bp+sgr+sgr", "infopro+sgr+sgr", "+sgr", "sgr+sgr", "dgl+"] {
            let e = bad.parse::<Method>().unwrap_err().to_string();
            assert!(e.contains("infopro-contrast+sgr"), "{bad}: {e}");
        }
    }
}
