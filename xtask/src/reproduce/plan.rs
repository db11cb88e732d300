//! The cells of a profile's grid and the `sgr` command line of each.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::table::{BatchSize, Kind, Profile};

/// What the command line may change in a profile (`--models`, `--ks`, ...).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Only these models of the grid (by `model` name).
    pub models: Option<Vec<String>>,
    /// These Ks instead of each row's.
    pub ks: Option<Vec<usize>>,
    /// These methods instead of each row's.
    pub methods: Option<Vec<String>>,
    /// These seeds instead of the profile's.
    pub seeds: Option<Vec<u64>>,
    /// Epochs instead of the profile's.
    pub epochs: Option<usize>,
    /// Training images instead of the profile's limit.
    pub train_limit: Option<usize>,
    /// Images per step instead of the profile's.
    pub batch: Option<usize>,
    /// Where to run instead of the profile's device.
    pub device: Option<String>,
    /// The data folder (`--data-dir`), when given.
    pub data_dir: Option<PathBuf>,
    /// Flags after `--`, given to every `sgr train` cell.
    pub extra: Vec<String>,
}

/// One cell: a model, a method, a K and a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// `--model`.
    pub model: String,
    /// The model's name in the table.
    pub label: String,
    /// The model whose published numbers the cell is compared with.
    pub reference_model: String,
    /// `--method`.
    pub method: String,
    /// `--modules` (1 for bp).
    pub k: usize,
    /// `--seed`.
    pub seed: u64,
    /// Epochs of the model's row, when it sets them.
    pub epochs: Option<usize>,
    /// The model's own recipe flags.
    pub flags: Vec<String>,
}

impl Cell {
    /// Whether the method adds SGR (`sgr` is `greedy+sgr`).
    pub fn has_sgr(&self) -> bool {
        self.method == "sgr" || self.method.ends_with("+sgr")
    }

    /// The cell's name, also its folder name before the hash.
    pub fn name(&self) -> String {
        format!("{}-{}-k{}-s{}", self.model, self.method, self.k, self.seed)
    }
}

/// A profile with the command line's changes applied: the cells and their command lines.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The profile as the table file has it.
    pub profile: Profile,
    /// The command line's changes.
    pub over: Overrides,
    /// Every cell, grouped by model, bp first within each model.
    pub cells: Vec<Cell>,
}

impl Plan {
    /// Expands `profile`'s grid after `over`; a `--models` name not in the grid is an error
    /// listing the grid's models.
    pub fn new(profile: &Profile, over: Overrides) -> Result<Self> {
        if let Some(models) = &over.models {
            let known: Vec<&str> = profile.grid.iter().map(|r| r.model.as_str()).collect();
            for m in models {
                if !known.contains(&m.as_str()) {
                    bail!(
                        "--models: `{m}` is not in this profile's grid; it has {}",
                        known.join(", ")
                    );
                }
            }
        }
        let seeds = over.seeds.clone().unwrap_or_else(|| profile.seeds.clone());
        let mut cells = Vec::new();
        for row in &profile.grid {
            if over
                .models
                .as_ref()
                .is_some_and(|m| !m.contains(&row.model))
            {
                continue;
            }
            let methods = over.methods.clone().unwrap_or_else(|| row.methods.clone());
            let ks = over.ks.clone().unwrap_or_else(|| row.ks.clone());
            let label = row.label.clone().unwrap_or_else(|| row.model.clone());
            let reference_model = row
                .reference_model
                .clone()
                .unwrap_or_else(|| row.model.clone());
            let cell = |method: &str, k: usize, seed: u64| Cell {
                model: row.model.clone(),
                label: label.clone(),
                reference_model: reference_model.clone(),
                method: method.to_string(),
                k,
                seed,
                epochs: row.epochs,
                flags: row.flags.clone(),
            };
            for &seed in &seeds {
                if methods.iter().any(|m| m == "bp") {
                    cells.push(cell("bp", 1, seed));
                }
            }
            for &k in &ks {
                for m in methods.iter().filter(|m| *m != "bp") {
                    for &seed in &seeds {
                        cells.push(cell(m, k, seed));
                    }
                }
            }
        }
        if cells.is_empty() {
            bail!("the grid is empty after --models/--methods/--ks");
        }
        Ok(Self {
            profile: profile.clone(),
            over,
            cells,
        })
    }

    /// Where the cells run.
    pub fn device(&self) -> &str {
        self.over.device.as_deref().unwrap_or(&self.profile.device)
    }

    /// Epochs of the training cell `c`: `--epochs`, else its row's, else the profile's.
    pub fn epochs(&self, c: &Cell) -> usize {
        self.over
            .epochs
            .or(c.epochs)
            .or(self.profile.epochs)
            .unwrap_or(1)
    }

    /// Training images per epoch, when known.
    pub fn train_images(&self) -> Option<usize> {
        self.over
            .train_limit
            .or(self.profile.train_limit)
            .or(self.profile.train_images)
    }

    /// The fixed batch size, or `None` when the profile fits it to the memory budget.
    pub fn batch(&self) -> Option<usize> {
        match (self.over.batch, &self.profile.batch) {
            (Some(b), _) => Some(b),
            (None, BatchSize::Fixed(b)) => Some(*b),
            (None, BatchSize::Fit) => None,
        }
    }

    /// Optimisation steps of the training cell `c` (for estimates), when the data's size is
    /// known.
    pub fn steps(&self, c: &Cell) -> Option<usize> {
        let b = self.batch()?;
        self.train_images().map(|n| n.div_ceil(b) * self.epochs(c))
    }

    fn method_args(&self, c: &Cell) -> Vec<String> {
        let mut a = strings(&[
            "--model",
            &c.model,
            "--method",
            &c.method,
            "--modules",
            &c.k.to_string(),
        ]);
        if c.has_sgr() {
            a.extend(self.profile.sgr_flags.iter().cloned());
        }
        a
    }

    /// `sgr train` flags of a cell (without `--out`).
    pub fn train_args(&self, c: &Cell) -> Vec<String> {
        debug_assert_eq!(self.profile.kind, Kind::Train);
        let data = self.profile.data.as_ref();
        let mut a = self.method_args(c);
        if let Some(d) = data {
            a.extend(strings(&["--dataset", &d.dataset]));
        }
        if let Some(dir) = &self.over.data_dir {
            a.extend(strings(&["--data-dir", &dir.display().to_string()]));
        }
        a.extend(strings(&[
            "--epochs",
            &self.epochs(c).to_string(),
            "--batch-size",
            &self.batch().unwrap_or(1).to_string(),
            "--seed",
            &c.seed.to_string(),
            "--device",
            self.device(),
        ]));
        if let Some(n) = self.over.train_limit.or(self.profile.train_limit) {
            a.extend(strings(&["--train-limit", &n.to_string()]));
        }
        a.extend(self.profile.flags.iter().cloned());
        a.extend(c.flags.iter().cloned());
        let mut a = without_overridden(a, &self.over.extra);
        a.extend(self.over.extra.iter().cloned());
        a
    }

    /// `sgr bench` flags of a cell at `batch` images per step, timing `steps` steps.
    pub fn bench_args(&self, c: &Cell, batch: usize, steps: usize) -> Vec<String> {
        let [channels, side, _] = self.profile.input;
        let mut a = self.method_args(c);
        a.extend(strings(&[
            "--batch-size",
            &batch.to_string(),
            "--steps",
            &steps.to_string(),
            "--in-channels",
            &channels.to_string(),
            "--input-size",
            &side.to_string(),
            "--classes",
            &self.profile.classes.to_string(),
            "--device",
            self.device(),
        ]));
        a
    }
}

/// `args` without the flags that `extra` gives again (each with its value), so that flags
/// after `--` replace the recipe's instead of repeating them (`sgr` refuses a flag twice).
fn without_overridden(args: Vec<String>, extra: &[String]) -> Vec<String> {
    let given: Vec<&str> = extra
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap_or(a))
        .collect();
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        if a.starts_with("--") && given.contains(&a.as_str()) {
            if it.peek().is_some_and(|v| !v.starts_with("--")) {
                it.next();
            }
            continue;
        }
        out.push(a);
    }
    out
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reproduce::table::{tables_dir, TableSpec};

    fn table1() -> TableSpec {
        TableSpec::load(&tables_dir(&crate::root()), "table1").unwrap()
    }

    #[test]
    fn the_grid_runs_bp_once_per_model_and_the_local_methods_at_each_k() {
        let t = table1();
        let plan = Plan::new(t.profile("fashion").unwrap(), Overrides::default()).unwrap();
        let names: Vec<String> = plan.cells.iter().map(Cell::name).collect();
        assert_eq!(names[0], "resnet32-bp-k1-s0");
        assert_eq!(names.iter().filter(|n| n.contains("-bp-")).count(), 1);
        assert!(names.contains(&"resnet32-infopro+sgr-k16-s0".to_string()));
        assert!(names.contains(&"resnet32-greedy-k8-s0".to_string()));
        assert_eq!(names.len(), 1 + 2 * 4, "{names:?}");
    }

    /// The fashion profile's flags are those `scripts/baselines_fmnist.sh` trained with, so
    /// those runs have the same spec hash and `--reuse` can take them.
    #[test]
    fn train_and_bench_command_lines() {
        let t = table1();
        let over = Overrides {
            seeds: Some(vec![0, 1]),
            methods: Some(vec!["bp".into(), "sgr".into()]),
            ks: Some(vec![4]),
            extra: strings(&["--workers", "2", "--lr", "0.1", "--sgr-lambda", "3"]),
            ..Default::default()
        };
        let plan = Plan::new(t.profile("fashion").unwrap(), over).unwrap();
        assert_eq!(plan.cells.len(), 4);
        let sgr = plan.cells.iter().find(|c| c.method == "sgr").unwrap();
        assert_eq!(
            plan.train_args(sgr).join(" "),
            "--model resnet32 --method sgr --modules 4 --sgr-distance squared-l2 \
             --sgr-grad forward-difference --dataset fashion-mnist --epochs 5 --batch-size 128 \
             --seed 0 --device cpu --train-limit 10000 --workers 2 --lr 0.1 --sgr-lambda 3"
        );
        assert_eq!(
            plan.bench_args(&plan.cells[0], 128, 1).join(" "),
            "--model resnet32 --method bp --modules 1 --batch-size 128 --steps 1 --in-channels 1 \
             --input-size 32 --classes 10 --device cpu"
        );
        assert_eq!(plan.steps(&plan.cells[0]), Some(79 * 5));
        let e = Plan::new(
            t.profile("fashion").unwrap(),
            Overrides {
                models: Some(vec!["resnet56".into()]),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`resnet56` is not in this profile's grid; it has resnet32"),
            "{e}"
        );
    }
}
