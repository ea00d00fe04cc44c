//! Byte quantities as Kubernetes writes them (`10Gi`, `4G`, `1500`, `1e3`).
//!
//! The API server canonicalises quantities it stores (`4000000000` comes back
//! as `4G`), so "did the capacity change?" must compare numbers, not strings.

/// Parses a quantity into whole bytes; `None` for malformed, fractional or
/// out-of-range values.
pub fn parse_bytes(raw: &str) -> Option<i64> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(raw.len());
    let (number, suffix) = raw.split_at(split);
    if number.is_empty() {
        return None;
    }
    let multiplier: i128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        s if s.starts_with(['e', 'E']) => {
            let exponent: u32 = s[1..].parse().ok()?;
            10i128.checked_pow(exponent)?
        }
        _ => return None,
    };
    // Decimal fractions are allowed when the result is whole ("1.5Gi").
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let negative = whole.starts_with('-');
    let whole = whole.trim_start_matches(['+', '-']);
    let digits = format!("{whole}{fraction}");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let scaled: i128 = digits.parse::<i128>().ok()?.checked_mul(multiplier)?;
    let divisor = 10i128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    if scaled % divisor != 0 {
        return None;
    }
    let value = scaled / divisor;
    i64::try_from(if negative { -value } else { value }).ok()
}

/// Writes bytes as a quantity: the plain integer, which every client reads.
pub fn format_bytes(bytes: i64) -> String {
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_parse_to_bytes() {
        let cases = [
            ("0", 0),
            ("1500", 1500),
            ("10Gi", 10 << 30),
            ("4G", 4_000_000_000),
            ("1Ki", 1024),
            ("1.5Gi", 3 << 29),
            ("1e3", 1000),
            ("2E", 2_000_000_000_000_000_000),
            ("7Ei", 7 << 60),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_bytes(raw), Some(want), "{raw}");
        }
    }

    #[test]
    fn malformed_or_fractional_bytes_are_rejected() {
        for raw in ["", "Gi", "1.5", "100m", "1x", "9Ei0", "16Ei"] {
            assert_eq!(parse_bytes(raw), None, "{raw}");
        }
    }

    #[test]
    fn format_round_trips() {
        for bytes in [0, 1, 1 << 40, i64::MAX] {
            assert_eq!(parse_bytes(&format_bytes(bytes)), Some(bytes));
        }
    }
}
