//! Checkpoints on the Hugging Face Hub: `hf://owner/repo[@revision][/file]` references, the
//! standard cache layout (`models--owner--repo/{blobs,refs,snapshots/<commit>/<file>}`), and
//! downloads through `hf-hub` (feature `hub`).
//!
//! hf-hub 1.0 does not read `HF_HUB_OFFLINE` (docs/candle.md), so it is handled here: when it
//! is set, references resolve from the cache only, without touching the network.
//!
//! The cache is contained: references are parsed strictly (owner, repository, revision and
//! file part of safe characters, no `.` or `..` components, no absolute paths), a
//! `refs/<revision>` must hold a 40-hex commit, and every path read from the cache is
//! canonicalized (following links) and refused unless it is a regular file inside the
//! repository's folder of the canonical cache root (its `refs/`, `blobs/` or `snapshots/`).

use std::io::Read;
use std::path::{Path, PathBuf};

#[cfg(feature = "hub")]
use anyhow::Context;
use anyhow::{anyhow, bail, Result};

/// Files that make a checkpoint, in download order; the first two are required.
pub const CHECKPOINT_FILES: [&str; 3] = ["config.json", "model.safetensors", "README.md"];

/// What `hf://owner/repo[@revision][/file]` allows, for error messages.
const SYNTAX: &str = "hf://owner/repo[@revision][/file]";

/// The most bytes of a `refs/<revision>` file that are read (a commit hash and a newline fit).
const MAX_REF_BYTES: u64 = 256;

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
    ///
    /// The owner and repository are Hub names (letters, digits, `-`, `_`, `.`; no `--` or `..`;
    /// not starting or ending with `-` or `.`), the revision a branch or tag name of the same
    /// characters or a 40-hex commit, and the file part one or more `/`-separated components of
    /// safe characters, none empty, `.` or `..`. An empty file part (`hf://a/b/`) means none.
    pub fn parse(s: &str) -> Option<Result<Self>> {
        let rest = s.strip_prefix("hf://")?;
        let (owner, after) = rest.split_once('/').unwrap_or((rest, ""));
        let (repo_rev, file) = match after.split_once('/') {
            Some((repo_rev, file)) => (repo_rev, Some(file)),
            None => (after, None),
        };
        let (repo, revision) = match repo_rev.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev.to_string())),
            None => (repo_rev, None),
        };
        let r = Self {
            owner: owner.to_string(),
            repo: repo.to_string(),
            revision,
            file: file.filter(|f| !f.is_empty()).map(str::to_string),
        };
        Some(
            r.validate()
                .map(|()| r)
                .map_err(|problem| anyhow!("`{}` is not {SYNTAX}: {problem}", s.escape_debug())),
        )
    }

    /// Checks every part of the reference, as [`HfRef::parse`] does; the problem when not.
    fn validate(&self) -> Result<(), String> {
        check_name("owner", &self.owner)?;
        check_name("repository name", &self.repo)?;
        if let Some(rev) = &self.revision {
            check_revision(rev)?;
        }
        if let Some(file) = &self.file {
            check_file(file)?;
        }
        Ok(())
    }

    /// `owner/repo`.
    pub fn repo_id(&self) -> String {
        format!("{}/{}", self.owner, self.repo)
    }

    /// The revision, `main` when none is given.
    fn revision_or_main(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// `hf://owner/repo@revision[/file]`, naming a reference (and one of its files) in errors.
    fn label(&self, file: Option<&str>) -> String {
        let mut s = format!("hf://{}@{}", self.repo_id(), self.revision_or_main());
        if let Some(f) = file {
            s.push('/');
            s.push_str(&f.escape_debug().to_string());
        }
        s
    }

    /// The folder name of the repository in the cache: `models--owner--repo`.
    fn folder_name(&self) -> String {
        format!("models--{}--{}", self.owner, self.repo)
    }
}

/// Whether `c` may appear in an owner, repository or revision name.
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.".contains(c)
}

/// Whether `c` may appear in a component of a file part.
fn file_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.+=,@~".contains(c)
}

/// Checks an owner or repository name (`what`); the problem when it is not a Hub name.
fn check_name(what: &str, x: &str) -> Result<(), String> {
    let shown = x.escape_debug();
    if x.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if let Some(c) = x.chars().find(|&c| !name_char(c)) {
        return Err(format!(
            "the {what} `{shown}` has {c:?}; names are letters, digits, `-`, `_` and `.`"
        ));
    }
    if x.starts_with(['-', '.']) || x.ends_with(['-', '.']) || x.contains("--") || x.contains("..")
    {
        return Err(format!(
            "the {what} `{shown}` starts or ends with `-` or `.`, or has `--` or `..`, which Hub names never do"
        ));
    }
    Ok(())
}

/// Checks a revision; the problem when it is neither a safe branch or tag name nor a commit.
fn check_revision(rev: &str) -> Result<(), String> {
    let shown = rev.escape_debug();
    if rev.is_empty() {
        return Err("the revision after `@` is empty; give a branch, a tag or a 40-hex commit, or leave out `@` for `main`".into());
    }
    if let Some(c) = rev.chars().find(|&c| !name_char(c)) {
        return Err(format!(
            "the revision `{shown}` has {c:?}; a revision is a branch or tag name (letters, digits, `-`, `_`, `.`) or a 40-hex commit"
        ));
    }
    if rev.starts_with('.') || rev.contains("..") {
        return Err(format!(
            "the revision `{shown}` starts with `.` or has `..`; a revision is a branch or tag name or a 40-hex commit"
        ));
    }
    Ok(())
}

/// Checks the file part of a reference; the problem when it could name something outside the
/// repository (absolute, `.` or `..` components) or has unsafe characters.
fn check_file(file: &str) -> Result<(), String> {
    let shown = file.escape_debug();
    let hint = "name a file from the repository's root, like `model.safetensors` or `subdir/model.safetensors`";
    if file.starts_with('/') {
        return Err(format!(
            "the file part `{shown}` starts with `/` (an absolute path); {hint}"
        ));
    }
    if file.contains('\\') {
        return Err(format!("the file part `{shown}` has a backslash; {hint}"));
    }
    if file.contains('\0') {
        return Err(format!(
            "the file part `{shown}` has a NUL character; {hint}"
        ));
    }
    for part in file.split('/') {
        if part.is_empty() {
            return Err(format!(
                "the file part `{shown}` has an empty path component (`//` or a trailing `/`); {hint}"
            ));
        }
        if part == "." || part == ".." {
            return Err(format!(
                "the file part `{shown}` has a `{part}` component, which could leave the repository; {hint}"
            ));
        }
        if let Some(c) = part.chars().find(|&c| !file_char(c)) {
            return Err(format!(
                "the file part `{shown}` has {c:?}; file names are letters, digits and `-_.+=,@~`; {hint}"
            ));
        }
    }
    Ok(())
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

/// Whether `s` is a 40-hex commit hash.
fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Canonicalizes `path` (following every link); `None` when it, or what a link on the way
/// points to, does not exist (or a folder on the way is a file). Other failures (a link loop, no permission) are errors naming
/// `label`, the reference being resolved.
fn resolve(label: &str, path: &Path) -> Result<Option<PathBuf>> {
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(Some(p)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(None)
        }
        Err(e) => bail!(
            "{label}: cannot resolve the cache entry {}: {e}; delete it and download the file again",
            path.display()
        ),
    }
}

/// Refuses `real`, what the cache entry `path` resolved to, unless it lies inside one of
/// `allowed` (folders of the repository in the canonical cache root) and is a regular file
/// (a directory when `dir`).
fn contained(label: &str, path: &Path, real: &Path, allowed: &[PathBuf], dir: bool) -> Result<()> {
    if !allowed.iter().any(|a| real.starts_with(a)) {
        let inside: Vec<String> = allowed.iter().map(|a| a.display().to_string()).collect();
        bail!(
            "{label}: the cache entry {} resolves to {}, which is outside the cache (it must lie in {}); refusing to read it: delete the entry (or the repository's folder) and download it again",
            path.display(),
            real.display(),
            inside.join(" or ")
        );
    }
    let meta = std::fs::metadata(real).map_err(|e| {
        anyhow!(
            "{label}: cannot read the cache entry {} ({}): {e}",
            path.display(),
            real.display()
        )
    })?;
    let (ok, want) = if dir {
        (meta.is_dir(), "a directory")
    } else {
        (meta.is_file(), "a regular file")
    };
    if !ok {
        let is = if meta.is_dir() {
            "a directory"
        } else if meta.is_file() {
            "a regular file"
        } else {
            "a special file"
        };
        bail!(
            "{label}: the cache entry {} resolves to {}, which is {is}, not {want}; delete it and download it again",
            path.display(),
            real.display()
        );
    }
    Ok(())
}

/// The folder of `r` in the canonical cache root; `None` when the cache does not exist.
fn repo_folder(root: &Path, r: &HfRef) -> Result<Option<PathBuf>> {
    let Some(root) = resolve(&r.label(None), root)? else {
        return Ok(None);
    };
    Ok(root.is_dir().then(|| root.join(r.folder_name())))
}

/// The cached snapshot folder of `r` in its repository folder `dir` (inside the canonical cache
/// root), if its revision is known there.
///
/// The revision comes from `refs/<revision>`, which must be a regular file of the repository's
/// `refs/` holding a 40-hex commit; the snapshot must be a folder inside `snapshots/`. Anything
/// else is an error that names the reference and the offending path.
fn snapshot_in(dir: &Path, r: &HfRef) -> Result<Option<PathBuf>> {
    let label = r.label(None);
    let rev = r.revision_or_main();
    let commit = if is_commit(rev) {
        rev.to_string()
    } else {
        let path = dir.join("refs").join(rev);
        let Some(real) = resolve(&label, &path)? else {
            return Ok(None);
        };
        contained(&label, &path, &real, &[dir.join("refs")], false)?;
        let mut bytes = Vec::new();
        sgr_schema::file::open_regular(&real, MAX_REF_BYTES)
            .and_then(|f| f.take(MAX_REF_BYTES).read_to_end(&mut bytes))
            .map_err(|e| anyhow!("{label}: cannot read the cache ref {}: {e}", path.display()))?;
        let text = String::from_utf8_lossy(&bytes);
        let commit = text.trim();
        if !is_commit(commit) {
            let shown: String = commit.escape_debug().take(80).collect();
            bail!(
                "{label}: the cache ref {} holds `{shown}`, not a 40-hex commit hash; delete it and download the repository again (hf-hub writes the ref anew)",
                path.display()
            );
        }
        commit.to_string()
    };
    let snap = dir.join("snapshots").join(&commit);
    let Some(real) = resolve(&label, &snap)? else {
        return Ok(None);
    };
    contained(&label, &snap, &real, &[dir.join("snapshots")], true)?;
    Ok(Some(snap))
}

/// The cache entry `snap/file` of `r` when it is a regular file in the repository folder `dir`
/// (its `blobs/` or `snapshots/`, after following links); `None` when it does not exist.
fn cached_file(r: &HfRef, dir: &Path, snap: &Path, file: &str) -> Result<Option<PathBuf>> {
    let label = r.label(Some(file));
    let path = snap.join(file);
    let Some(real) = resolve(&label, &path)? else {
        return Ok(None);
    };
    contained(
        &label,
        &path,
        &real,
        &[dir.join("blobs"), dir.join("snapshots")],
        false,
    )?;
    Ok(Some(path))
}

/// The cached path of each of `files` of `r` under `root` (`None` for those not cached).
fn cached_files(root: &Path, r: &HfRef, files: &[&str]) -> Result<Vec<Option<PathBuf>>> {
    let none = || vec![None; files.len()];
    let Some(dir) = repo_folder(root, r)? else {
        return Ok(none());
    };
    let Some(snap) = snapshot_in(&dir, r)? else {
        return Ok(none());
    };
    files
        .iter()
        .map(|f| cached_file(r, &dir, &snap, f))
        .collect()
}

/// Resolves the files of a checkpoint reference to local paths: from the cache when offline,
/// when the revision is a commit that is cached, or when this binary has no Hub client;
/// otherwise through hf-hub (which fills the standard cache).
///
/// Every path returned is a regular file inside the repository's folder of the cache root.
pub fn fetch(r: &HfRef, files: &[&str]) -> Result<Vec<PathBuf>> {
    r.validate()
        .map_err(|problem| anyhow!("{} is not {SYNTAX}: {problem}", r.label(None)))?;
    for f in files {
        check_file(f).map_err(|problem| anyhow!("{}: {problem}", r.label(None)))?;
    }
    let root = cache_root();
    let cached = cached_files(&root, r, files)?;
    let pinned = r.revision.as_deref().is_some_and(is_commit);
    if cached.iter().all(Option::is_some) && (offline() || pinned || !cfg!(feature = "hub")) {
        return Ok(cached.into_iter().flatten().collect());
    }
    if offline() {
        let missing: Vec<&str> = files
            .iter()
            .zip(&cached)
            .filter(|(_, c)| c.is_none())
            .map(|(f, _)| *f)
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
    let paths = download(r, files, &root)?;
    let Some(dir) = repo_folder(&root, r)? else {
        bail!(
            "{}: the Hub cache {} does not exist after downloading into it",
            r.label(None),
            root.display()
        );
    };
    paths
        .into_iter()
        .zip(files)
        .map(|(path, f)| {
            let label = r.label(Some(f));
            let real = resolve(&label, &path)?.ok_or_else(|| {
                anyhow!(
                    "{label}: the downloaded file {} does not exist",
                    path.display()
                )
            })?;
            contained(
                &label,
                &path,
                &real,
                &[dir.join("blobs"), dir.join("snapshots")],
                false,
            )?;
            Ok(path)
        })
        .collect()
}

/// Downloads `files` of `r` into the cache at `root` through hf-hub.
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

/// Without the Hub client: says which files are missing from the cache and how to get them.
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

    #[test]
    fn refuses_file_parts_and_revisions_that_could_leave_the_cache() {
        let ok = |s: &str| HfRef::parse(s).unwrap().is_ok();
        assert!(ok("hf://a/b/"));
        assert!(ok("hf://a/b@v1.0/sub/model-00001-of-00002.safetensors"));
        assert!(ok(&format!("hf://a/b@{}/config.json", "ab".repeat(20))));
        for bad in [
            "hf://a/b//etc/passwd",
            "hf://a/b/../../x",
            "hf://a/b/sub/../x",
            "hf://a/b/./x",
            "hf://a/b/sub//x",
            "hf://a/b/x/",
            "hf://a/b/x\\y",
            "hf://a/b/x\0y",
            "hf://a/b@../x",
            "hf://a/b@..",
            "hf://a/b@.x",
            "hf://a/b@v 1",
            "hf://../b",
            "hf://a/..",
            "hf://a--b/c",
            "hf://a/b@v1@v2",
        ] {
            let e = HfRef::parse(bad).unwrap().unwrap_err().to_string();
            assert!(e.contains("is not hf://owner/repo"), "{bad}: {e}");
        }
    }

    /// Any text after `hf://` parses or is refused, never panics, and what parses cannot name a
    /// path outside the repository.
    #[test]
    fn any_reference_parses_safely() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let mut r = TestRunner::new_with_rng(
            Config {
                cases: 512,
                failure_persistence: None,
                ..Config::default()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &[5; 32]),
        );
        let piece = prop_oneof![
            Just("/".to_string()),
            Just("..".to_string()),
            Just(".".to_string()),
            Just("@".to_string()),
            Just("\\".to_string()),
            Just("\0".to_string()),
            "[a-z0-9._-]{0,6}",
            any::<String>(),
        ];
        r.run(&proptest::collection::vec(piece, 0..8), |parts| {
            let s = format!("hf://{}", parts.concat());
            if let Some(Ok(h)) = HfRef::parse(&s) {
                for part in [Some(&h.owner), Some(&h.repo), h.revision.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    prop_assert!(
                        !part.contains('/') && part != ".." && !part.is_empty(),
                        "{s}"
                    );
                }
                if let Some(f) = &h.file {
                    prop_assert!(
                        !f.starts_with('/') && !f.contains('\\') && !f.contains('\0'),
                        "{s}"
                    );
                    prop_assert!(f.split('/').all(|c| c != ".." && c != "."), "{s}");
                }
            }
            Ok(())
        })
        .unwrap();
    }
}
