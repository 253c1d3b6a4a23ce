//! A minimal command-line parser for the daemons and tools: `--flag`,
//! `--key value` and `--key=value`, with typed getters and clear errors.

use std::collections::BTreeMap;
use std::str::FromStr;

/// Parsed arguments.
#[derive(Debug, Default)]
pub struct Args {
    values: BTreeMap<String, String>,
    flags: Vec<String>,
    positional: Vec<String>,
}

impl Args {
    /// Parses `args` (without the program name). `flags` lists the options
    /// that take no value; every other `--name` takes one.
    pub fn parse<I: IntoIterator<Item = String>>(args: I, flags: &[&str]) -> Result<Args, String> {
        let mut out = Args::default();
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                out.positional.push(a);
                continue;
            };
            if let Some((k, v)) = name.split_once('=') {
                out.values.insert(k.to_owned(), v.to_owned());
            } else if flags.contains(&name) {
                out.flags.push(name.to_owned());
            } else {
                let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
                out.values.insert(name.to_owned(), v);
            }
        }
        Ok(out)
    }

    /// Whether a flag was given.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    /// A string option.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// A typed option, or `default`.
    pub fn get_or<T: FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("invalid value {v:?} for --{name}")),
        }
    }

    /// Positional arguments.
    pub fn positional(&self) -> &[String] {
        &self.positional
    }

    /// Refuses options not in `known` (flags and valued options).
    pub fn check_known(&self, known: &[&str]) -> Result<(), String> {
        for k in self.values.keys().chain(self.flags.iter()) {
            if !known.contains(&k.as_str()) {
                return Err(format!("unknown option --{k}"));
            }
        }
        Ok(())
    }
}

/// `--spin-us N` (default 50 us): how long an idle worker polls its rings
/// before it sleeps on their kicks.
pub fn spin(args: &Args) -> Result<std::time::Duration, String> {
    let us: u64 = args.get_or("spin-us", 50)?;
    if us > 10_000_000 {
        return Err("--spin-us must be at most 10000000".into());
    }
    Ok(std::time::Duration::from_micros(us))
}

/// Parses a size such as `4096`, `64K`, `512M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("invalid size {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn parses_flags_values_and_equals() {
        let a = Args::parse(
            args(&["--read-only", "--num-queues", "2", "--size=1G", "x"]),
            &["read-only"],
        )
        .unwrap();
        assert!(a.flag("read-only"));
        assert_eq!(a.get_or("num-queues", 1u16), Ok(2));
        assert_eq!(a.get("size"), Some("1G"));
        assert_eq!(a.positional(), ["x"]);
        assert!(a.check_known(&["read-only", "num-queues"]).is_err());
        assert!(a.check_known(&["read-only", "num-queues", "size"]).is_ok());
        assert!(Args::parse(args(&["--socket-path"]), &[]).is_err());
        assert!(a.get_or::<u16>("size", 1).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
