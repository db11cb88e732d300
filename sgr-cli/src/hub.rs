//! Checkpoints on the Hugging Face Hub: `hf://owner/repo[@revision][/file]` references, the
//! standard cache layout (`models--owner--repo/{blobs,refs,snapshots/<commit>/<file>}`), and
//! downloads through `hf-hub` (feature `hub`).
//!
//! hf-hub 1.0 does not read `HF_HUB_OFFLINE` (docs/candle.md), so it is handled here: when it
//! is set, references resolve from the cache only, without touching the network.

use std::path::{Path, PathBuf};

#[cfg(feature = "hub")]
use anyhow::Context;
use anyhow::{bail, Result};

/// Files that make a checkpoint, in download order; the first two are required.
pub const CHECKPOINT_FILES: [&str; 3] = ["config.json", "model.safetensors", "README.md"];

/// A parsed `hf://owner/repo[@revision][/file]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfRef {
    /// Owner (user or organisation).
    pub owner: String,
    /// Repository name.
    pub repo: String,
    /// Branch, tag or 40-hex commit (default `main`).
    pub revision: Option<String>,
    /// A file inside the repository.
    pub file: Option<String>,
}

impl HfRef {
    /// Parses a reference; `None` when `s` does not start with `hf://`.
    pub fn parse(s: &str) -> Option<Result<Self>> {
        let rest = s.strip_prefix("hf://")?;
        Some((|| {
            let mut parts = rest.splitn(3, '/');
            let owner = parts.next().unwrap_or_default();
            let repo_rev = parts.next().unwrap_or_default();
            let file = parts.next().filter(|f| !f.is_empty()).map(str::to_string);
            let (repo, revision) = match repo_rev.split_once('@') {
                Some((r, v)) => (r, Some(v.to_string())),
                None => (repo_rev, None),
            };
            let ok = |x: &str| {
                !x.is_empty()
                    && x.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            if !ok(owner) || !ok(repo) || revision.as_deref().is_some_and(|r| r.is_empty()) {
                bail!("`{s}` is not hf://owner/repo[@revision][/file]");
            }
            Ok(Self {
                owner: owner.to_string(),
                repo: repo.to_string(),
                revision,
                file,
            })
        })())
    }

    /// `owner/repo`.
    pub fn repo_id(&self) -> String {
        format!("{}/{}", self.owner, self.repo)
    }

    fn revision_or_main(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// The Hub cache root: `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`, or
/// `~/.cache/huggingface/hub`.
pub fn cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .unwrap_or_else(|| {
            var("HOME")
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".cache/huggingface/hub")
        })
}

/// Whether `HF_HUB_OFFLINE` asks for no network access.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The cached snapshot folder of `r` under `root`, if its revision is known there.
pub fn cached_snapshot(root: &Path, r: &HfRef) -> Option<PathBuf> {
    let repo_dir = root.join(format!("models--{}--{}", r.owner, r.repo));
    let rev = r.revision_or_main();
    let commit = if is_commit(rev) {
        rev.to_string()
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(rev))
            .ok()?
            .trim()
            .to_string()
    };
    let snap = repo_dir.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

/// Resolves the files of a checkpoint reference to local paths: from the cache when offline,
/// when the revision is a commit that is cached, or when this binary has no Hub client;
/// otherwise through hf-hub (which fills the standard cache).
pub fn fetch(r: &HfRef, files: &[&str]) -> Result<Vec<PathBuf>> {
    let root = cache_root();
    let cached = |f: &str| {
        cached_snapshot(&root, r)
            .map(|s| s.join(f))
            .filter(|p| p.is_file())
    };
    let pinned = r.revision.as_deref().is_some_and(is_commit);
    let all_cached: Option<Vec<PathBuf>> = files.iter().map(|f| cached(f)).collect();
    if let Some(paths) = &all_cached {
        if offline() || pinned || !cfg!(feature = "hub") {
            return Ok(paths.clone());
        }
    }
    if offline() {
        let missing: Vec<&str> = files
            .iter()
            .copied()
            .filter(|f| cached(f).is_none())
            .collect();
        bail!(
            "HF_HUB_OFFLINE is set and {} of hf://{}@{} {} not in the Hub cache {}",
            missing.join(", "),
            r.repo_id(),
            r.revision_or_main(),
            if missing.len() == 1 { "is" } else { "are" },
            root.display()
        );
    }
    download(r, files, &root)
}

#[cfg(feature = "hub")]
fn download(r: &HfRef, files: &[&str], root: &Path) -> Result<Vec<PathBuf>> {
    let client = hf_hub::HFClient::builder()
        .cache_dir(root)
        .build_sync()
        .context("creating the Hugging Face Hub client")?;
    let repo = client.model(&r.owner, &r.repo);
    files
        .iter()
        .map(|f| {
            repo.download_file()
                .filename(*f)
                .maybe_revision(r.revision.clone())
                .send()
                .with_context(|| format!("downloading {f} of hf://{}", r.repo_id()))
        })
        .collect()
}

#[cfg(not(feature = "hub"))]
fn download(r: &HfRef, files: &[&str], root: &Path) -> Result<Vec<PathBuf>> {
    bail!(
        "hf://{}: {} not in the Hub cache {}, and this sgr binary was built without the Hub client; rebuild with `cargo build --release -p sgr-cli --features hub`, or put the files in the cache",
        r.repo_id(),
        files.join(", "),
        root.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let r = HfRef::parse("hf://sgr-rs/resnet32-cifar10@v1/model.safetensors")
            .unwrap()
            .unwrap();
        assert_eq!(r.owner, "sgr-rs");
        assert_eq!(r.repo, "resnet32-cifar10");
        assert_eq!(r.revision.as_deref(), Some("v1"));
        assert_eq!(r.file.as_deref(), Some("model.safetensors"));
        let r = HfRef::parse("hf://a/b").unwrap().unwrap();
        assert_eq!((r.revision, r.file), (None, None));
        assert!(HfRef::parse("hf://a").unwrap().is_err());
        assert!(HfRef::parse("hf://a/b@").unwrap().is_err());
        assert!(HfRef::parse("runs/x").is_none());
    }
}
