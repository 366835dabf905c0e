//! Memory sizes as people write them (`--memory-budget 8GiB`) and read them (`15.7 MB`).

use anyhow::{bail, Result};

/// The syntax of a SIZE, for error messages.
const SIZE_SYNTAX: &str = "expected bytes or a number with a unit: K, M, G, T (powers of 1000, \
                           also KB, MB, GB, TB) or KiB, MiB, GiB, TiB (powers of 1024), \
                           case-insensitive, e.g. 512M, 8GiB, 1.5T";

/// A memory size as given on the command line or in the environment: its bytes and the text
/// it was written as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Size {
    pub bytes: u64,
    pub text: String,
}

impl Size {
    /// Parses a SIZE (see [`parse_size`]); the value parser of `--memory-budget`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(Self {
            bytes: parse_size(s)?,
            text: s.trim().to_string(),
        })
    }
}

/// Bytes of a SIZE: a whole number of bytes (`1048576`, `1048576B`), or a number, possibly
/// with a fraction, and a unit: `K`, `M`, `G`, `T` or `KB` ... `TB` (powers of 1000), `KiB` ...
/// `TiB` (powers of 1024); case-insensitive, a space allowed before the unit. A fraction of a
/// byte is rounded down. Zero is refused (it would refuse every request).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u128 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => bail!("{s:?} is not a size: unknown unit {unit:?}; {SIZE_SYNTAX}"),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        bail!("{s:?} is not a size: {SIZE_SYNTAX}");
    }
    let too_large = || anyhow::anyhow!("{s:?} is too large a size (at most 2^64 - 1 bytes)");
    let mut mantissa: u128 = 0;
    for c in int.chars().chain(frac.chars()) {
        let d = u128::from(c.to_digit(10).unwrap_or(0));
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(d))
            .ok_or_else(too_large)?;
    }
    let scale = u32::try_from(frac.len())
        .ok()
        .and_then(|n| 10u128.checked_pow(n))
        .ok_or_else(too_large)?;
    let bytes = mantissa.checked_mul(mult).ok_or_else(too_large)? / scale;
    let bytes = u64::try_from(bytes).map_err(|_| too_large())?;
    if bytes == 0 {
        bail!("{s:?}: a memory budget must be at least 1 byte");
    }
    Ok(bytes)
}

/// A byte count for people: decimal units, three significant figures.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    let (v, unit) = if b >= 1e12 {
        (b / 1e12, "TB")
    } else if b >= 1e9 {
        (b / 1e9, "GB")
    } else if b >= 1e6 {
        (b / 1e6, "MB")
    } else if b >= 1e3 {
        (b / 1e3, "kB")
    } else {
        return format!("{bytes} bytes");
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_bytes_and_decimal_and_binary_units() {
        let cases: &[(&str, u64)] = &[
            ("1", 1),
            ("4096", 4096),
            ("4096b", 4096),
            ("512M", 512_000_000),
            ("512mb", 512_000_000),
            ("8G", 8_000_000_000),
            ("8GB", 8_000_000_000),
            ("8gb", 8_000_000_000),
            ("8GiB", 8 << 30),
            ("8gib", 8 << 30),
            ("1.5T", 1_500_000_000_000),
            ("1.5TiB", 3 << 39),
            ("2K", 2_000),
            ("2KiB", 2048),
            ("0.5k", 500),
            (" 3 MiB ", 3 << 20),
            ("1.", 1),
            (".5G", 500_000_000),
            ("18446744073709551615", u64::MAX),
        ];
        for (s, want) in cases {
            assert_eq!(parse_size(s).unwrap(), *want, "{s}");
        }
    }

    #[test]
    fn bad_sizes_are_errors_that_quote_them() {
        for s in [
            "",
            "G",
            "abc",
            "8X",
            "8 GiBs",
            "-1G",
            "1e9",
            "1.2.3G",
            "0",
            "0.0001",
            "inf",
            "1,5G",
            "18446744073709551616",
            "20000000T",
        ] {
            let e = parse_size(s).unwrap_err().to_string();
            assert!(e.contains(&format!("{s:?}")), "{s}: {e}");
        }
        assert!(parse_size("8X").unwrap_err().to_string().contains("GiB"));
    }

    #[test]
    fn human_bytes_keeps_three_figures() {
        assert_eq!(human_bytes(999), "999 bytes");
        assert_eq!(human_bytes(15_728_640), "15.7 MB");
        assert_eq!(human_bytes(128_849_018_880), "129 GB");
        assert_eq!(human_bytes(4_026_531_840), "4.03 GB");
    }
}
