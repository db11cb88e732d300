//! The command-line flags of the xtask commands.

use anyhow::{bail, Context, Result};

/// Flag parser: `--name value` pairs before an optional `--`, the rest passed through.
pub struct Flags {
    /// The `--name value` pairs, in order (a name given twice keeps both; the last wins).
    named: Vec<(String, String)>,
    /// The arguments after `--`, passed through to `sgr train`.
    pub rest: Vec<String>,
}

impl Flags {
    /// Parses `args`, accepting only the flag names in `known` (without their `--`).
    pub fn parse(args: &[String], known: &[&str]) -> Result<Self> {
        Self::parse_with(args, known, &[])
    }

    /// [`Flags::parse`], also accepting the value-less flags in `switches` (read with
    /// [`Flags::has`]).
    pub fn parse_with(args: &[String], known: &[&str], switches: &[&str]) -> Result<Self> {
        let mut named = Vec::new();
        let mut rest = Vec::new();
        let mut i = 0;
        while i < args.len() {
            if args[i] == "--" {
                rest.extend(args[i + 1..].iter().cloned());
                break;
            }
            let name = args[i].trim_start_matches("--");
            if args[i].starts_with("--") && switches.contains(&name) {
                named.push((name.to_string(), String::new()));
                i += 1;
                continue;
            }
            if !args[i].starts_with("--") || !known.contains(&name) {
                let all: Vec<&str> = known.iter().chain(switches).copied().collect();
                bail!(
                    "unknown argument `{}`; known: --{}",
                    args[i],
                    all.join(", --")
                );
            }
            let value = args
                .get(i + 1)
                .with_context(|| format!("{} needs a value", args[i]))?;
            named.push((name.to_string(), value.clone()));
            i += 2;
        }
        Ok(Self { named, rest })
    }

    /// The value of `--name`, the last one when it was given more than once.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.named
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the switch `--name` was given.
    pub fn has(&self, name: &str) -> bool {
        self.named.iter().any(|(n, _)| n == name)
    }

    /// Every value of `--name`, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.named
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The comma-separated integers of `--name`, or of `default` when it was not given.
    pub fn list(&self, name: &str, default: &str) -> Result<Vec<u64>> {
        self.get(name)
            .unwrap_or(default)
            .split(',')
            .map(|s| s.trim().parse().with_context(|| format!("--{name}: `{s}`")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_parse_named_values_and_pass_the_rest_through() {
        let f = Flags::parse(
            &args(&[
                "--epochs", "3", "--seeds", "0,1,2", "--", "--model", "resnet8",
            ]),
            &["epochs", "seeds", "out"],
        )
        .unwrap();
        assert_eq!(f.get("epochs"), Some("3"));
        assert_eq!(f.list("seeds", "0").unwrap(), vec![0, 1, 2]);
        assert_eq!(f.list("missing", "4,5").unwrap(), vec![4, 5]);
        assert_eq!(f.rest, args(&["--model", "resnet8"]));
    }

    #[test]
    fn switches_and_repeated_flags() {
        let f = Flags::parse_with(
            &args(&["--dry-run", "--reuse", "a", "--reuse", "b"]),
            &["reuse"],
            &["dry-run"],
        )
        .unwrap();
        assert!(f.has("dry-run") && !f.has("verbose"));
        assert_eq!(f.all("reuse"), ["a", "b"]);
        let e = Flags::parse_with(&args(&["--x"]), &["reuse"], &["dry-run"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("known: --reuse, --dry-run"), "{e}");
    }

    #[test]
    fn flags_reject_unknown_or_incomplete_arguments() {
        let e = Flags::parse(&args(&["--epoch", "3"]), &["epochs"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("unknown argument `--epoch`"), "{e}");
        let e = Flags::parse(&args(&["--epochs"]), &["epochs"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("needs a value"), "{e}");
        let f = Flags::parse(&args(&["--seeds", "1,x"]), &["seeds"]).unwrap();
        assert!(f.list("seeds", "0").is_err());
    }
}
