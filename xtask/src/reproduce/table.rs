//! A table's specification, read from `xtask/tables/<name>.toml`: what it shows, the grid of
//! cells each profile runs, and the published numbers printed beside ours (docs/reproduce.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

/// One table: `xtask/tables/<name>.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// Heading of the printed table.
    pub title: String,
    /// What the table shows and which claim it checks.
    pub about: String,
    /// The picture: test error against K, one line per model and method.
    #[serde(default)]
    pub plot: Option<PlotSpec>,
    /// The ways to run the grid, by name (`full`, `memory`, `fashion`, `smoke`).
    pub profile: BTreeMap<String, Profile>,
    /// Published numbers of earlier methods, each with its source.
    #[serde(default)]
    pub reference: Vec<Reference>,
    /// The SGR paper's own numbers: a slot that prints "n/a" until filled in from the PDF.
    #[serde(default)]
    pub paper: Vec<Reference>,
    /// Print published rows of the grid's models even for methods the grid does not run.
    #[serde(default)]
    pub show_unrun_references: bool,
}

/// Where the table's picture goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlotSpec {
    /// File name, written next to the table.
    pub file: String,
}

/// What a profile measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Every cell is a training run (`sgr train`): error, memory and time.
    Train,
    /// Every cell is a few steps on random inputs of the real shapes (`sgr bench`): memory
    /// and time, no error.
    Memory,
}

/// The batch size of a profile: fixed, or the largest that fits in the memory budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchSize {
    /// This many images per step.
    Fixed(usize),
    /// The largest batch whose bp step fits in the memory budget (memory profiles).
    Fit,
}

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(usize),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) if n > 0 => Ok(BatchSize::Fixed(n)),
            Raw::Word(w) if w == "fit" => Ok(BatchSize::Fit),
            _ => Err(serde::de::Error::custom(
                "batch must be a positive number of images or \"fit\"",
            )),
        }
    }
}

/// The data a profile trains on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `--dataset` of `sgr train`.
    pub dataset: String,
    /// Where the files are looked for when `--data-dir` is not given (`sgr`'s own default);
    /// without it, `--data-dir` is required (unless the data set is embedded).
    #[serde(default)]
    pub default_dir: Option<PathBuf>,
    /// The layout expected under the data folder, in words, for errors and `--dry-run`.
    #[serde(default)]
    pub layout: Option<String>,
    /// Paths that must exist under the data folder; any one of the alternatives suffices.
    #[serde(default)]
    pub expect: Vec<Vec<String>>,
    /// The data set is a stand-in for the paper's (said above the table).
    #[serde(default)]
    pub substitute: Option<String>,
}

impl DataSpec {
    /// Whether the data needs a folder at all (the embedded digits do not).
    pub fn needs_dir(&self) -> bool {
        !self.expect.is_empty()
    }

    /// Checks that `dir` holds the data, with an error that says what is expected where and
    /// what the folder holds instead.
    pub fn check_dir(&self, dir: &Path, flag_given: bool) -> Result<()> {
        let how = if flag_given {
            format!("--data-dir {}", dir.display())
        } else {
            format!(
                "{} (the default; pass --data-dir DIR for another folder)",
                dir.display()
            )
        };
        let layout = self.layout.clone().unwrap_or_else(|| self.expect_text());
        if !dir.is_dir() {
            bail!(
                "{how} is not a folder. The {} data is expected there as: {layout}",
                self.dataset
            );
        }
        if self
            .expect
            .iter()
            .any(|alt| alt.iter().all(|p| dir.join(p).exists()))
        {
            return Ok(());
        }
        let mut held: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        held.sort();
        let shown = if held.is_empty() {
            "nothing".to_string()
        } else if held.len() > 12 {
            format!("{}, … ({} entries)", held[..12].join(", "), held.len())
        } else {
            held.join(", ")
        };
        bail!(
            "{how} does not hold the {} data: expected {}; it holds {shown}. Layout: {layout}",
            self.dataset,
            self.expect_text()
        )
    }

    fn expect_text(&self) -> String {
        self.expect
            .iter()
            .map(|alt| alt.join(" + "))
            .collect::<Vec<_>>()
            .join(", or ")
    }
}

/// One way to run a table's grid.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// What this profile is, said above the table.
    pub about: String,
    /// Training runs or memory measurements.
    pub kind: Kind,
    /// The data (train profiles).
    #[serde(default)]
    pub data: Option<DataSpec>,
    /// The device the profile is meant for; `--device` overrides it.
    #[serde(default = "default_device")]
    pub device: String,
    /// Epochs per run (train profiles).
    #[serde(default)]
    pub epochs: Option<usize>,
    /// Images per step.
    pub batch: BatchSize,
    /// Training images per epoch (`--train-limit`); all of the data set's when absent.
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Training images of the full data set, for estimates when there is no limit.
    #[serde(default)]
    pub train_images: Option<usize>,
    /// Input `[channels, height, width]`: the random inputs of memory cells and estimates.
    pub input: [usize; 3],
    /// Classes of the data.
    pub classes: usize,
    /// Timed steps of a memory cell (after one warm-up step).
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Seeds; each cell runs once per seed.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Flags every `sgr train` cell gets (the recipe).
    #[serde(default)]
    pub flags: Vec<String>,
    /// Flags the `+sgr` cells get on top (SGR's settings).
    #[serde(default)]
    pub sgr_flags: Vec<String>,
    /// The models of the grid, each with its Ks and methods.
    pub grid: Vec<GridRow>,
    /// Why methods of the paper's rows are missing from the grid (said under the table).
    #[serde(default)]
    pub not_run: Vec<String>,
}

fn default_device() -> String {
    "cpu".into()
}

fn default_steps() -> usize {
    2
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// One model of a profile's grid: it runs `bp` once (K = 1) and every other method at each K.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridRow {
    /// `--model`.
    pub model: String,
    /// The name printed in the table when it differs from the model's (`ResNet-101 at width 8`).
    #[serde(default)]
    pub label: Option<String>,
    /// Ks of the local methods.
    pub ks: Vec<usize>,
    /// Methods, `bp` included where the table has it.
    pub methods: Vec<String>,
    /// Epochs of this model's runs, when they differ from the profile's.
    #[serde(default)]
    pub epochs: Option<usize>,
    /// This model's recipe: flags its `sgr train` cells get after the profile's.
    #[serde(default)]
    pub flags: Vec<String>,
    /// The model whose published numbers this row is compared with, when it differs
    /// (a scaled-down stand-in).
    #[serde(default)]
    pub reference_model: Option<String>,
}

/// Published numbers of one method on one model, per K, with their source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// Model name, as sgr names it.
    pub model: String,
    /// Method, as sgr names it (`greedy` for Greedy SL, `infopro` for InfoPro's softmax mode).
    pub method: String,
    /// The Ks of the values (1 for end-to-end).
    pub ks: Vec<usize>,
    /// Test error (%) per K; empty when unknown.
    #[serde(default)]
    pub error: Vec<f64>,
    /// Training memory (GB per device, as published) per K; empty when unknown.
    #[serde(default)]
    pub memory_gb: Vec<f64>,
    /// Where the numbers come from.
    pub source: String,
}

impl Reference {
    /// The published (error %, memory GB) at `k`, each `None` when not given.
    pub fn at(&self, k: usize) -> (Option<f64>, Option<f64>) {
        match self.ks.iter().position(|&x| x == k) {
            Some(i) => (self.error.get(i).copied(), self.memory_gb.get(i).copied()),
            None => (None, None),
        }
    }
}

/// The folder of the table files.
pub fn tables_dir(root: &Path) -> PathBuf {
    root.join("xtask/tables")
}

/// The names of the tables in `dir`, sorted.
pub fn available(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".toml").map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

impl TableSpec {
    /// Reads `dir/<name>.toml`; an unknown name lists the tables that exist.
    pub fn load(dir: &Path, name: &str) -> Result<Self> {
        let names = available(dir);
        if !names.iter().any(|n| n == name) {
            bail!(
                "unknown table `{name}`; available: {} (files in {})",
                names.join(", "),
                dir.display()
            );
        }
        let path = dir.join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let spec: TableSpec =
            toml::from_str(&text).with_context(|| format!("{} is not a table", path.display()))?;
        spec.validate()
            .with_context(|| format!("checking {}", path.display()))?;
        Ok(spec)
    }

    /// The profile `name`; an unknown name lists the profiles that exist.
    pub fn profile(&self, name: &str) -> Result<&Profile> {
        self.profile.get(name).with_context(|| {
            format!(
                "unknown profile `{name}`; this table has: {}",
                self.profile.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Checks what serde cannot: non-empty grids, consistent references.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.profile.is_empty(), "the table has no profile");
        for (name, p) in &self.profile {
            ensure!(!p.grid.is_empty(), "profile `{name}` has an empty grid");
            ensure!(!p.seeds.is_empty(), "profile `{name}` has no seed");
            ensure!(p.steps >= 1, "profile `{name}`: steps must be at least 1");
            match p.kind {
                Kind::Train => {
                    ensure!(
                        p.data.is_some()
                            && (p.epochs.is_some() || p.grid.iter().all(|r| r.epochs.is_some())),
                        "profile `{name}` trains: it needs `data` and `epochs`"
                    );
                    ensure!(
                        p.batch != BatchSize::Fit,
                        "profile `{name}` trains: batch = \"fit\" is for memory profiles"
                    );
                }
                Kind::Memory => ensure!(
                    p.data.is_none() && p.epochs.is_none(),
                    "profile `{name}` measures memory on random inputs: it takes no `data` or `epochs`"
                ),
            }
            for row in &p.grid {
                ensure!(
                    !row.methods.is_empty(),
                    "profile `{name}`, model {}: no method",
                    row.model
                );
                let local = row.methods.iter().any(|m| m != "bp");
                ensure!(
                    !local || !row.ks.is_empty(),
                    "profile `{name}`, model {}: local methods need ks",
                    row.model
                );
                ensure!(
                    row.ks.iter().all(|&k| k >= 2),
                    "profile `{name}`, model {}: every K of a local method is at least 2",
                    row.model
                );
            }
        }
        for r in self.reference.iter().chain(&self.paper) {
            ensure!(
                r.error.is_empty() || r.error.len() == r.ks.len(),
                "reference {} {}: {} errors for {} Ks",
                r.model,
                r.method,
                r.error.len(),
                r.ks.len()
            );
            ensure!(
                r.memory_gb.is_empty() || r.memory_gb.len() == r.ks.len(),
                "reference {} {}: {} memories for {} Ks",
                r.model,
                r.method,
                r.memory_gb.len(),
                r.ks.len()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table in the repository parses and passes its checks.
    #[test]
    fn the_repository_tables_load() {
        let dir = tables_dir(&crate::root());
        let names = available(&dir);
        assert!(names.contains(&"table1".to_string()), "{names:?}");
        assert!(names.contains(&"table2".to_string()), "{names:?}");
        for name in names {
            let t = TableSpec::load(&dir, &name).unwrap();
            for p in ["full", "smoke"] {
                assert!(t.profile.contains_key(p), "{name} has no {p} profile");
            }
        }
    }

    #[test]
    fn unknown_tables_and_profiles_list_what_exists() {
        let dir = tables_dir(&crate::root());
        let e = TableSpec::load(&dir, "table9").unwrap_err().to_string();
        assert!(
            e.contains("unknown table `table9`; available: table1, table2"),
            "{e}"
        );
        let t = TableSpec::load(&dir, "table1").unwrap();
        let e = t.profile("fast").unwrap_err().to_string();
        assert!(
            e.contains("unknown profile `fast`; this table has:") && e.contains("smoke"),
            "{e}"
        );
    }

    #[test]
    fn batch_is_a_number_or_fit() {
        #[derive(Deserialize)]
        struct B {
            batch: BatchSize,
        }
        let b: B = toml::from_str("batch = 64").unwrap();
        assert_eq!(b.batch, BatchSize::Fixed(64));
        let b: B = toml::from_str("batch = \"fit\"").unwrap();
        assert_eq!(b.batch, BatchSize::Fit);
        for bad in ["batch = 0", "batch = \"auto\""] {
            let e = toml::from_str::<B>(bad).err().unwrap().to_string();
            assert!(
                e.contains("positive number of images or \"fit\""),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_missing_data_folder_says_what_is_expected_and_what_is_there() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataSpec {
            dataset: "cifar10".into(),
            default_dir: None,
            layout: Some("DIR/data_batch_1.bin … DIR/test_batch.bin".into()),
            expect: vec![
                vec!["data_batch_1.bin".into(), "test_batch.bin".into()],
                vec!["cifar-10-batches-bin/data_batch_1.bin".into()],
            ],
            substitute: None,
        };
        let missing = tmp.path().join("nope");
        let e = data.check_dir(&missing, true).unwrap_err().to_string();
        assert!(
            e.contains("is not a folder") && e.contains("DIR/data_batch_1.bin"),
            "{e}"
        );
        std::fs::write(tmp.path().join("README"), "").unwrap();
        let e = data.check_dir(tmp.path(), false).unwrap_err().to_string();
        assert!(
            e.contains("(the default; pass --data-dir DIR")
                && e.contains("expected data_batch_1.bin + test_batch.bin, or cifar-10-batches-bin/data_batch_1.bin")
                && e.contains("it holds README"),
            "{e}"
        );
        std::fs::create_dir(tmp.path().join("cifar-10-batches-bin")).unwrap();
        std::fs::write(tmp.path().join("cifar-10-batches-bin/data_batch_1.bin"), "").unwrap();
        data.check_dir(tmp.path(), true).unwrap();
    }
}
