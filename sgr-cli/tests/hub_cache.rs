//! The Hugging Face Hub cache is contained: `hf://` references never read outside the cache,
//! whatever the reference, the `refs/` files or the snapshot links say. Every test lays a cache
//! out by hand in a temporary folder and runs the `sgr` binary offline; none needs the network.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::text;

/// The commit of the hand-made snapshot.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A Hub cache laid out as hf-hub lays it out, holding `models--sgr-rs--tiny`.
struct Cache {
    /// The temporary folder holding the cache (`hub/`) and, for some tests, files outside it.
    tmp: tempfile::TempDir,
    /// The cache root, what `HF_HUB_CACHE` names.
    root: PathBuf,
    /// `models--sgr-rs--tiny`.
    repo: PathBuf,
    /// `snapshots/<COMMIT>`.
    snap: PathBuf,
}

impl Cache {
    /// An empty snapshot of `COMMIT`, with `refs/main` naming it.
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("hub");
        let repo = root.join("models--sgr-rs--tiny");
        let snap = repo.join("snapshots").join(COMMIT);
        for d in [repo.join("blobs"), repo.join("refs"), snap.clone()] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(repo.join("refs/main"), format!("{COMMIT}\n")).unwrap();
        Self {
            tmp,
            root,
            repo,
            snap,
        }
    }

    /// A snapshot with `config.json` and `model.safetensors` as links to blobs.
    fn with_checkpoint() -> Self {
        let c = Self::new();
        c.add("config.json", "{}");
        c.add("model.safetensors", "weights");
        c
    }

    /// Stores `contents` as a blob and links `file` of the snapshot to it, relatively, as the
    /// real cache does (`../../blobs/<hash>`, one more `..` per folder of `file`).
    fn add(&self, file: &str, contents: &str) {
        let blob = format!("blob-{}", file.replace('/', "-"));
        std::fs::write(self.repo.join("blobs").join(&blob), contents).unwrap();
        let link = self.snap.join(file);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let up = "../".repeat(2 + file.matches('/').count());
        std::os::unix::fs::symlink(format!("{up}blobs/{blob}"), link).unwrap();
    }

    /// A folder next to the cache (outside it) with a fake checkpoint that a reader escaping the
    /// cache would find.
    fn outside(&self) -> PathBuf {
        let dir = self.tmp.path().join("outside");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{\"secret\": true}").unwrap();
        std::fs::write(dir.join("model.safetensors"), "secret weights").unwrap();
        dir
    }

    /// Runs `sgr args` offline against this cache.
    fn sgr(&self, args: &[&str]) -> Output {
        sgr_in(&self.root, args)
    }
}

/// Runs `sgr args` offline with `HF_HUB_CACHE` set to `root`.
fn sgr_in(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_HOME")
        .env("HF_HUB_CACHE", root)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run sgr")
}

/// Asserts that the run failed cleanly (no panic) with an error holding every one of `needles`,
/// and that nothing from the outside folder was printed; returns its text.
fn refused(o: &Output, needles: &[&str]) -> String {
    let t = text(o);
    assert!(!o.status.success(), "succeeded: {t}");
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert!(t.starts_with("error: "), "{t}");
    for n in needles {
        assert!(t.contains(n), "no `{n}` in: {t}");
    }
    t
}

#[test]
fn absolute_and_parent_file_parts_are_refused() {
    let c = Cache::with_checkpoint();
    let outside = c.outside();
    let abs = format!(
        "hf://sgr-rs/tiny/{}",
        outside.join("model.safetensors").display()
    );
    assert!(abs.contains("tiny//"), "{abs}");
    let o = c.sgr(&["eval", "--checkpoint", &abs]);
    refused(&o, &["is not hf://owner/repo", "starts with `/`"]);

    for parent in [
        "hf://sgr-rs/tiny/../../../outside/model.safetensors".to_string(),
        format!("hf://sgr-rs/tiny@{COMMIT}/../../../../outside/model.safetensors"),
        "hf://sgr-rs/tiny/sub/../../../../../outside/model.safetensors".to_string(),
    ] {
        let o = c.sgr(&["eval", "--checkpoint", &parent]);
        refused(&o, &["is not hf://owner/repo", "`..` component"]);
    }
    for (bad, problem) in [
        ("hf://sgr-rs/tiny/./model.safetensors", "`.` component"),
        (
            "hf://sgr-rs/tiny/sub//model.safetensors",
            "empty path component",
        ),
        ("hf://sgr-rs/tiny/sub\\model.safetensors", "backslash"),
        ("hf://sgr-rs/tiny@../../outside", "revision"),
    ] {
        let o = c.sgr(&["eval", "--checkpoint", bad]);
        refused(&o, &["is not hf://owner/repo", problem]);
    }
    // `sgr train --init-from` parses the same way.
    let o = c.sgr(&["train", "--init-from", &abs, "--epochs", "1"]);
    refused(&o, &["starts with `/`"]);
}

#[test]
fn a_ref_pointing_outside_is_refused() {
    let c = Cache::with_checkpoint();
    c.outside();
    // snapshots/../../../outside is the folder next to the cache.
    std::fs::write(c.repo.join("refs/main"), "../../../outside").unwrap();
    let o = c.sgr(&["download", "hf://sgr-rs/tiny"]);
    let t = refused(
        &o,
        &["hf://sgr-rs/tiny@main", "refs/main", "not a 40-hex commit"],
    );
    assert!(!t.contains("outside/config.json"), "{t}");
    let o = c.sgr(&["eval", "--checkpoint", "hf://sgr-rs/tiny"]);
    refused(&o, &["refs/main", "not a 40-hex commit"]);

    // A ref that is itself a link out of the cache is refused before it is read.
    let secret = c.tmp.path().join("outside/ref");
    std::fs::write(&secret, COMMIT).unwrap();
    std::fs::remove_file(c.repo.join("refs/main")).unwrap();
    std::os::unix::fs::symlink(&secret, c.repo.join("refs/main")).unwrap();
    let o = c.sgr(&["download", "hf://sgr-rs/tiny"]);
    let real = secret.canonicalize().unwrap();
    refused(&o, &["outside the cache", &real.display().to_string()]);
}

#[test]
fn a_ref_that_is_not_a_commit_hash_is_refused() {
    let c = Cache::with_checkpoint();
    // A snapshot named like the ref, so that a reader trusting the ref would use it.
    let named = c.repo.join("snapshots/not-a-commit");
    std::fs::create_dir_all(&named).unwrap();
    std::fs::write(named.join("config.json"), "{}").unwrap();
    std::fs::write(named.join("model.safetensors"), "weights").unwrap();
    std::fs::write(c.repo.join("refs/main"), "not-a-commit\n").unwrap();
    let o = c.sgr(&["download", "hf://sgr-rs/tiny"]);
    refused(
        &o,
        &[
            "hf://sgr-rs/tiny@main",
            "refs/main",
            "`not-a-commit`",
            "not a 40-hex commit",
        ],
    );
    // Neither a short hash nor binary garbage passes.
    for bad in ["0123456789abcdef".as_bytes(), &[0xff, 0xfe, 0, 1][..]] {
        std::fs::write(c.repo.join("refs/main"), bad).unwrap();
        let o = c.sgr(&["download", "hf://sgr-rs/tiny"]);
        refused(&o, &["refs/main", "not a 40-hex commit"]);
    }
}

#[test]
fn snapshot_links_out_of_the_cache_are_refused() {
    let c = Cache::new();
    let outside = c.outside();
    c.add("model.safetensors", "weights");
    // An absolute link to a file outside the cache.
    let target = outside.join("config.json");
    std::os::unix::fs::symlink(&target, c.snap.join("config.json")).unwrap();
    let o = c.sgr(&["download", "hf://sgr-rs/tiny"]);
    let real = target.canonicalize().unwrap().display().to_string();
    let t = refused(
        &o,
        &[
            "hf://sgr-rs/tiny@main/config.json",
            "outside the cache",
            &real,
        ],
    );
    assert!(!t.contains("secret"), "{t}");
    let o = c.sgr(&["eval", "--checkpoint", "hf://sgr-rs/tiny"]);
    refused(&o, &["outside the cache", &real]);

    // A relative link climbing out, and one into another repository of the cache.
    std::fs::remove_file(c.snap.join("config.json")).unwrap();
    std::os::unix::fs::symlink(
        "../../../../outside/config.json",
        c.snap.join("config.json"),
    )
    .unwrap();
    let o = c.sgr(&["download", "hf://sgr-rs/tiny"]);
    refused(&o, &["outside the cache", &real]);
    let other = c.root.join("models--sgr-rs--other/blobs");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("b"), "{}").unwrap();
    std::fs::remove_file(c.snap.join("config.json")).unwrap();
    std::os::unix::fs::symlink(
        "../../../models--sgr-rs--other/blobs/b",
        c.snap.join("config.json"),
    )
    .unwrap();
    let o = c.sgr(&["download", "hf://sgr-rs/tiny"]);
    refused(&o, &["outside the cache", "models--sgr-rs--other"]);

    // The snapshot folder itself linked out of the cache, reached through a pinned commit.
    let pinned = "89abcdef0123456789abcdef0123456789abcdef";
    std::os::unix::fs::symlink(&outside, c.repo.join("snapshots").join(pinned)).unwrap();
    let o = c.sgr(&["download", &format!("hf://sgr-rs/tiny@{pinned}")]);
    let real = outside.canonicalize().unwrap().display().to_string();
    refused(&o, &["outside the cache", &real]);
}

#[test]
fn directories_and_link_loops_in_snapshots_are_refused() {
    let c = Cache::new();
    c.add("config.json", "{}");
    std::fs::create_dir_all(c.snap.join("model.safetensors")).unwrap();
    let o = c.sgr(&["download", "hf://sgr-rs/tiny"]);
    refused(
        &o,
        &[
            "hf://sgr-rs/tiny@main/model.safetensors",
            "a directory, not a regular file",
        ],
    );

    // A link to the blobs folder is no file either.
    std::fs::remove_dir(c.snap.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink("../../blobs", c.snap.join("model.safetensors")).unwrap();
    let o = c.sgr(&["download", "hf://sgr-rs/tiny"]);
    refused(&o, &["a directory, not a regular file"]);

    // Two links pointing at each other.
    std::fs::remove_file(c.snap.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink("loop-b", c.snap.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink("model.safetensors", c.snap.join("loop-b")).unwrap();
    let o = c.sgr(&["download", "hf://sgr-rs/tiny"]);
    refused(
        &o,
        &[
            "hf://sgr-rs/tiny@main/model.safetensors",
            "cannot resolve the cache entry",
            "model.safetensors",
        ],
    );
    let o = c.sgr(&["eval", "--checkpoint", "hf://sgr-rs/tiny"]);
    refused(&o, &["cannot resolve the cache entry"]);
}

#[test]
fn a_standard_cache_with_blob_links_still_resolves() {
    let c = Cache::with_checkpoint();
    c.add("README.md", "# tiny");
    c.add("sub/weights.safetensors", "more weights");
    std::fs::write(c.repo.join("refs/v1"), COMMIT).unwrap();

    for reference in [
        "hf://sgr-rs/tiny".to_string(),
        "hf://sgr-rs/tiny@v1".to_string(),
        format!("hf://sgr-rs/tiny@{COMMIT}"),
    ] {
        let o = c.sgr(&["download", &reference]);
        let t = text(&o);
        assert!(o.status.success(), "{reference}: {t}");
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        for (line, (name, contents)) in lines.iter().zip([
            ("config.json", "{}"),
            ("model.safetensors", "weights"),
            ("README.md", "# tiny"),
        ]) {
            let p = Path::new(line);
            assert!(line.contains(COMMIT) && line.ends_with(name), "{t}");
            assert_eq!(std::fs::read_to_string(p).unwrap(), contents);
            let real = p.canonicalize().unwrap();
            let blobs = c.repo.join("blobs").canonicalize().unwrap();
            assert!(real.starts_with(blobs), "{}", real.display());
        }
    }

    // A cache root reached through a link (a cache moved to another disk) is fine too.
    let link = c.tmp.path().join("hub-link");
    std::os::unix::fs::symlink(&c.root, &link).unwrap();
    let o = sgr_in(&link, &["download", "hf://sgr-rs/tiny"]);
    assert!(o.status.success(), "{}", text(&o));

    // A file part with a folder resolves: the fake checkpoint then fails to load, after the Hub
    // cache had nothing to say.
    let o = c.sgr(&[
        "eval",
        "--checkpoint",
        "hf://sgr-rs/tiny/sub/weights.safetensors",
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(!t.contains("panicked") && !t.contains("hf://"), "{t}");
    assert!(t.contains(COMMIT), "{t}");

    // Missing files are still reported as not cached.
    std::fs::remove_file(c.snap.join("model.safetensors")).unwrap();
    let o = c.sgr(&["download", "hf://sgr-rs/tiny"]);
    refused(
        &o,
        &[
            "HF_HUB_OFFLINE",
            "model.safetensors",
            "not in the Hub cache",
        ],
    );
}

/// A configuration downloaded from the Hub may not name local files: a class index outside its
/// snapshot is refused before anything reads it (it could be /dev/zero, or a private file), and
/// its data folder is not used.
#[test]
fn a_hub_configuration_may_not_name_local_files() {
    for index in ["/dev/zero", "../../../../outside/config.json"] {
        let c = Cache::new();
        c.outside();
        c.add(
            "config.json",
            &format!(
                r#"{{"model": "resnet8", "dataset": "imagefolder", "data_dir": "/", "class_index": "{index}"}}"#
            ),
        );
        c.add("model.safetensors", "weights");
        let o = c.sgr(&["eval", "--checkpoint", "hf://sgr-rs/tiny"]);
        let t = refused(&o, &["class_index", "not a file of its snapshot"]);
        assert!(!t.contains("secret"), "{t}");
    }
}
