//! Byte sizes as Kubernetes quantities: `2Gi`, `500M`, `1048576`.

/// A size that is not a non-negative quantity with a binary or decimal suffix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid size {0:?}: expected a number with an optional suffix Ki, Mi, Gi, Ti, k, M, G or T"
)]
pub struct BadSize(pub String);

/// Parses a quantity into bytes. Fractions are allowed ("1.5Gi") and round down.
pub fn parse_size(text: &str) -> Result<u64, BadSize> {
    let bad = || BadSize(text.to_string());
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(bad()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || fraction.contains('.') || (number.contains('.') && fraction.is_empty()) {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let mut bytes = whole.checked_mul(multiplier).ok_or_else(bad)?;
    if !fraction.is_empty() {
        let digits = fraction.len().min(9) as u32;
        let numerator: u64 = fraction[..digits as usize].parse().map_err(|_| bad())?;
        let part = (numerator as u128 * multiplier as u128) / 10u128.pow(digits);
        bytes = bytes.checked_add(part as u64).ok_or_else(bad)?;
    }
    Ok(bytes)
}

/// Formats bytes for people with binary suffixes: `0`, `512`, `1.5Ki`, `2.0Gi`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_quantities() {
        assert_eq!(parse_size("2Gi"), Ok(2 << 30));
        assert_eq!(parse_size("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_size("500M"), Ok(500_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in [
            "",
            "Gi",
            "1.Gi",
            ".5Gi",
            "1..5",
            "2GB",
            "-1",
            "1.2.3Mi",
            "99999999999Ti",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(1023), "1023");
        assert_eq!(format_size(1536), "1.5Ki");
        assert_eq!(format_size(2 << 30), "2.0Gi");
    }
}
