//! How a model is cut into K gradient-isolated modules, for every family of the zoo.
//!
//! A model is a sequence of units (a stem, then its blocks). A split is the list of units after
//! which a module ends. The published split points live next to each architecture, as data;
//! this file turns a strategy, a K and those tables into a [`SplitPlan`], and computes the
//! memory-balanced split ([`balanced_ends`]) from measured per-unit costs (docs/models.md,
//! "Splits").

use sgr_core::network::SplitPlan;
use sgr_core::{Error, Result};

/// How a network is cut into K modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitStrategy {
    /// The model's published split for K when it has one (InfoPro's), otherwise uniform.
    #[default]
    Auto,
    /// InfoPro's published split points; one module per block is also accepted.
    Infopro,
    /// InfoPro*'s memory-balanced CIFAR splits (ResNet-110, K = 2, 3, 4).
    InfoproBalanced,
    /// K contiguous groups of units, as equal in unit count as possible.
    Uniform,
    /// One module per unit (K = the number of units).
    Block,
    /// The contiguous cut that minimises the largest module's measured training memory
    /// ([`balanced_ends`]); its end points are measured before the model is built.
    Balanced,
}

sgr_core::named_enum!(SplitStrategy, "split", {
    "auto" => Auto,
    "infopro" => Infopro,
    "infopro-balanced" => InfoproBalanced,
    "uniform" => Uniform,
    "block" => Block,
    "balanced" => Balanced,
});

/// Published split points in `[stage, block]` notation: for each K, the points after which a
/// module ends (the last module's end is implicit).
pub type Table = &'static [(usize, &'static [(usize, usize)])];

/// A model's published split points as unit indices: for each K, the ends of modules 1..K-1.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// InfoPro's split points.
    pub infopro: Vec<(usize, Vec<usize>)>,
    /// InfoPro*'s memory-balanced split points.
    pub infopro_balanced: Vec<(usize, Vec<usize>)>,
}

impl Published {
    /// Converts `[stage, block]` tables with `unit_of`, naming `model` when a point is not in it.
    pub fn from_tables(
        model: &str,
        infopro: Option<Table>,
        infopro_balanced: Option<Table>,
        unit_of: impl Fn(usize, usize) -> Option<usize>,
    ) -> Result<Self> {
        let convert = |t: Option<Table>| -> Result<Vec<(usize, Vec<usize>)>> {
            t.unwrap_or(&[])
                .iter()
                .map(|(k, points)| {
                    let ends = points
                        .iter()
                        .map(|&(s, b)| {
                            unit_of(s, b).ok_or_else(|| {
                                Error::InvalidConfig(format!(
                                    "split point [{s},{b}] is not in {model}"
                                ))
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Ok((*k, ends))
                })
                .collect()
        };
        Ok(Self {
            infopro: convert(infopro)?,
            infopro_balanced: convert(infopro_balanced)?,
        })
    }
}

/// What a family hands to [`resolve`]: the model, its units, and its published points.
#[derive(Debug, Clone)]
pub struct SplitRequest<'a> {
    /// Model name, for errors.
    pub model: &'a str,
    /// Number of units (stem plus blocks).
    pub units: usize,
    /// Number of modules K.
    pub modules: usize,
    /// The strategy.
    pub strategy: SplitStrategy,
    /// Published points of the model.
    pub published: &'a Published,
    /// Measured end points (all K of them, the last = `units - 1`), for [`SplitStrategy::Balanced`].
    pub ends: Option<&'a [usize]>,
}

/// The split plan a request asks for; an unsupported K or strategy is an error naming what
/// the model supports.
pub fn resolve(req: &SplitRequest<'_>) -> Result<SplitPlan> {
    let (units, k, model) = (req.units, req.modules, req.model);
    if let Some(ends) = req.ends {
        if req.strategy != SplitStrategy::Balanced {
            return Err(Error::InvalidConfig(format!(
                "explicit split ends {ends:?} were given with the {} split; they belong to \
                 the balanced split",
                req.strategy
            )));
        }
        if ends.len() != k {
            return Err(Error::InvalidConfig(format!(
                "the balanced split of {model} has {} modules, but K={k} was asked for",
                ends.len()
            )));
        }
        return SplitPlan::new(units, ends.to_vec());
    }
    if k == 0 || k > units {
        return Err(Error::UnsupportedSplit {
            model: model.to_string(),
            requested: format!("K={k}"),
            supported: format!("K from 1 to {units} (one module per block)"),
        });
    }
    if k == 1 {
        return SplitPlan::single(units);
    }
    let table = |t: &[(usize, Vec<usize>)]| {
        t.iter().find(|(kk, _)| *kk == k).map(|(_, ends)| {
            let mut e = ends.clone();
            e.push(units - 1);
            SplitPlan::new(units, e)
        })
    };
    match req.strategy {
        SplitStrategy::Auto => {
            table(&req.published.infopro).unwrap_or_else(|| SplitPlan::uniform(units, k))
        }
        SplitStrategy::Uniform => SplitPlan::uniform(units, k),
        SplitStrategy::Block if k == units => SplitPlan::uniform(units, k),
        SplitStrategy::Block => Err(Error::UnsupportedSplit {
            model: model.to_string(),
            requested: format!("K={k} with the block split"),
            supported: format!("K={units} (one module per block); leave --modules out"),
        }),
        SplitStrategy::Balanced => Err(Error::InvalidConfig(format!(
            "the balanced split of {model} is measured before the model is built: run `sgr \
             train --split balanced` (or call sgr_run::split::balanced_plan); it needs the \
             measured end points"
        ))),
        SplitStrategy::Infopro if k == units => SplitPlan::uniform(units, k),
        SplitStrategy::Infopro | SplitStrategy::InfoproBalanced => {
            let (t, name) = if req.strategy == SplitStrategy::Infopro {
                (&req.published.infopro, "InfoPro")
            } else {
                (&req.published.infopro_balanced, "InfoPro*'s balanced")
            };
            if let Some(plan) = table(t) {
                return plan;
            }
            let supported = if t.is_empty() {
                format!(
                    "{model} has no {name} split points; use --split uniform, block or balanced"
                )
            } else {
                let mut ks: Vec<String> = vec!["1".into()];
                ks.extend(t.iter().map(|(kk, _)| kk.to_string()));
                if req.strategy == SplitStrategy::Infopro {
                    ks.push(format!("{units} (one module per block)"));
                }
                format!("K in {{{}}}", ks.join(", "))
            };
            Err(Error::UnsupportedSplit {
                model: model.to_string(),
                requested: format!("K={k} with the {} split", req.strategy),
                supported,
            })
        }
    }
}

/// What one unit costs in training memory, measured (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnitCost {
    /// Bytes the unit's forward graph holds until the backward pass (plus the gradients of its
    /// weights), in a module that does not record its decisions.
    pub held: u64,
    /// The same in a module that carries an SGR term: the tape of non-smooth decisions its
    /// finite differences replay (ReLU masks, max-pool selections, dropout masks), and the
    /// extra gradient buffers of the term (`sgr_run::memory::SGR_GRAD_SETS`).
    pub held_sgr: u64,
    /// Peak bytes above the graphs while a module containing this unit runs its step: the
    /// backward's in-flight gradients at this unit, the head when the module ends here, the
    /// SGR passes.
    pub tail: u64,
}

/// Which modules of a split carry an SGR term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SgrModules {
    /// None (no SGR).
    #[default]
    None,
    /// Every module but the first (SGR's forward direction).
    AllButFirst,
    /// Every module but the last (SGR's backward direction).
    AllButLast,
}

impl SgrModules {
    /// Whether module `m` of `k` carries the term.
    pub fn records(&self, m: usize, k: usize) -> bool {
        match self {
            SgrModules::None => false,
            SgrModules::AllButFirst => m > 0,
            SgrModules::AllButLast => m + 1 < k,
        }
    }
}

/// The cost model of a module of units `i..=j`: the graphs of its units, plus the largest tail
/// among them (the backward's in-flight gradients are largest at the widest unit; the head's
/// graph is small beside them).
pub fn module_cost(costs: &[UnitCost], i: usize, j: usize, records: bool) -> u64 {
    let graphs: u64 = costs[i..=j]
        .iter()
        .map(|c| if records { c.held_sgr } else { c.held })
        .sum();
    graphs + costs[i..=j].iter().map(|c| c.tail).max().unwrap_or(0)
}

/// The end points of the contiguous split of `costs.len()` units into `k` modules that
/// minimises the largest [`module_cost`], found exactly by dynamic programming over all
/// contiguous partitions (O(K·n²)). Among optimal splits it returns the one whose earlier modules
/// end as late as possible.
pub fn balanced_ends(costs: &[UnitCost], k: usize, recording: SgrModules) -> Result<Vec<usize>> {
    let n = costs.len();
    if k == 0 || k > n {
        return Err(Error::UnsupportedSplit {
            model: format!("a network of {n} units"),
            requested: format!("K={k} with the balanced split"),
            supported: format!("K from 1 to {n}"),
        });
    }
    // best[m][j]: the smallest largest-module cost of units 0..=j cut into m+1 modules.
    let mut best = vec![vec![u64::MAX; n]; k];
    let mut cut = vec![vec![0usize; n]; k];
    for (j, b) in best[0].iter_mut().enumerate() {
        *b = module_cost(costs, 0, j, recording.records(0, k));
    }
    for m in 1..k {
        let records = recording.records(m, k);
        for j in m..n {
            // The last module is i..=j; the first m modules cover 0..i.
            for i in m..=j {
                let prev = best[m - 1][i - 1];
                if prev == u64::MAX {
                    continue;
                }
                let c = prev.max(module_cost(costs, i, j, records));
                if c <= best[m][j] {
                    best[m][j] = c;
                    cut[m][j] = i;
                }
            }
        }
    }
    let mut ends = vec![0usize; k];
    let mut j = n - 1;
    for m in (0..k).rev() {
        ends[m] = j;
        if m > 0 {
            j = cut[m][j] - 1;
        }
    }
    Ok(ends)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(held: &[u64]) -> Vec<UnitCost> {
        held.iter()
            .map(|&h| UnitCost {
                held: h,
                held_sgr: h,
                tail: 0,
            })
            .collect()
    }

    /// Every contiguous split into k modules, by brute force.
    fn brute(c: &[UnitCost], k: usize, rec: SgrModules) -> u64 {
        fn go(c: &[UnitCost], start: usize, m: usize, k: usize, rec: SgrModules) -> u64 {
            let n = c.len();
            if m + 1 == k {
                return module_cost(c, start, n - 1, rec.records(m, k));
            }
            (start..=n - (k - m))
                .map(|end| {
                    module_cost(c, start, end, rec.records(m, k)).max(go(c, end + 1, m + 1, k, rec))
                })
                .min()
                .unwrap()
        }
        go(c, 0, 0, k, rec)
    }

    #[test]
    fn balanced_is_optimal_against_brute_force() {
        let mut seed = 7u64;
        for n in 1..9 {
            for _ in 0..20 {
                let c: Vec<UnitCost> = (0..n)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        UnitCost {
                            held: (seed >> 33) % 100,
                            held_sgr: (seed >> 33) % 100 + (seed >> 40) % 50,
                            tail: (seed >> 20) % 30,
                        }
                    })
                    .collect();
                for k in 1..=n {
                    for rec in [
                        SgrModules::None,
                        SgrModules::AllButFirst,
                        SgrModules::AllButLast,
                    ] {
                        let ends = balanced_ends(&c, k, rec).unwrap();
                        assert_eq!(ends.len(), k);
                        let plan = SplitPlan::new(n, ends.clone()).unwrap();
                        let worst = (0..k)
                            .map(|m| {
                                let r = plan.range(m);
                                module_cost(&c, r.start, r.end - 1, rec.records(m, k))
                            })
                            .max()
                            .unwrap();
                        assert_eq!(worst, brute(&c, k, rec), "n={n} k={k} ends={ends:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn balanced_moves_cuts_towards_heavy_units() {
        // A heavy first unit (an ImageNet stem) gets a module of its own.
        let none = SgrModules::None;
        assert_eq!(
            balanced_ends(&costs(&[10, 1, 1, 1, 1]), 2, none).unwrap(),
            vec![0, 4]
        );
        assert_eq!(
            balanced_ends(&costs(&[1, 1, 1, 1, 10]), 2, none).unwrap(),
            vec![3, 4]
        );
        assert!(balanced_ends(&costs(&[1, 1]), 3, none).is_err());
        // Modules with an SGR term hold more: the first module (which has none under the
        // forward direction) takes more units.
        let c: Vec<UnitCost> = [4u64, 4, 4, 4]
            .iter()
            .map(|&h| UnitCost {
                held: h,
                held_sgr: 2 * h,
                tail: 0,
            })
            .collect();
        assert_eq!(balanced_ends(&c, 2, none).unwrap(), vec![1, 3]);
        assert_eq!(
            balanced_ends(&c, 2, SgrModules::AllButFirst).unwrap(),
            vec![2, 3]
        );
    }

    #[test]
    fn resolve_names_what_is_supported() {
        let published = Published {
            infopro: vec![(2, vec![3])],
            infopro_balanced: vec![],
        };
        let req = |k, strategy| SplitRequest {
            model: "m",
            units: 8,
            modules: k,
            strategy,
            published: &published,
            ends: None,
        };
        assert_eq!(
            resolve(&req(2, SplitStrategy::Auto)).unwrap().ends(),
            &[3, 7]
        );
        assert_eq!(
            resolve(&req(2, SplitStrategy::Uniform)).unwrap().ends(),
            &[3, 7]
        );
        assert_eq!(
            resolve(&req(3, SplitStrategy::Auto)).unwrap().ends(),
            &[2, 5, 7]
        );
        assert_eq!(
            resolve(&req(8, SplitStrategy::Block))
                .unwrap()
                .num_modules(),
            8
        );
        let e = resolve(&req(3, SplitStrategy::Block))
            .unwrap_err()
            .to_string();
        assert!(e.contains("K=8"), "{e}");
        let e = resolve(&req(3, SplitStrategy::Infopro))
            .unwrap_err()
            .to_string();
        assert!(e.contains("K in {1, 2, 8 (one module per block)}"), "{e}");
        let e = resolve(&req(2, SplitStrategy::InfoproBalanced))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no InfoPro*'s balanced split points"), "{e}");
        let e = resolve(&req(2, SplitStrategy::Balanced))
            .unwrap_err()
            .to_string();
        assert!(e.contains("measured"), "{e}");
        let ends = [0usize, 7];
        let ok = SplitRequest {
            ends: Some(&ends),
            ..req(2, SplitStrategy::Balanced)
        };
        assert_eq!(resolve(&ok).unwrap().ends(), &[0, 7]);
        let e = resolve(&req(9, SplitStrategy::Uniform))
            .unwrap_err()
            .to_string();
        assert!(e.contains("K from 1 to 8"), "{e}");
    }
}
