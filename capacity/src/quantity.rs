//! Byte quantities as Kubernetes writes them (`10Gi`, `4G`, `1500`, `1e3`).
//!
//! The API server canonicalises quantities it stores (`4000000000` comes back
//! as `4G`), so "did the capacity change?" must compare numbers, not strings.
//! volplane writes the form the API server keeps, so what users read in
//! go-templates and `kubectl describe` is `100Gi`, not `107374182400`.

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

/// Writes bytes as Kubernetes stores them: `resource.Quantity`'s canonical
/// binary-SI form (`100Gi`, `30716Mi`, `1500Ki`; values below 1024 and
/// values that are no whole number of KiB in decimal SI, `1k`, `1536`).
///
/// Binary SI falls back to a plain integer when a suffix would round, and
/// the API server reads a plain integer as decimal SI and stores it in that
/// canonical form: `2000` is kept as `2k`. This function returns that
/// stored form, so an object volplane wrote reads back exactly as written
/// and is never rewritten only for its spelling.
pub fn format_bytes(bytes: i64) -> String {
    const BINARY: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    const DECIMAL: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
    let value = i128::from(bytes);
    if value.abs() >= 1024 && value % 1024 == 0 {
        let (mantissa, power) = remove_factors(value, 1024);
        return format!("{mantissa}{}", BINARY[power]);
    }
    // Decimal SI: trailing zeros in groups of three become a suffix.
    let (mantissa, zeros) = remove_factors(value, 10);
    let power = zeros / 3;
    let mantissa = mantissa * 10i128.pow(u32::try_from(zeros % 3).unwrap_or(0));
    format!("{mantissa}{}", DECIMAL[power])
}

/// `value` without its factors `base`, and how many there were.
fn remove_factors(value: i128, base: i128) -> (i128, usize) {
    let (mut value, mut times) = (value, 0);
    while value != 0 && value % base == 0 {
        value /= base;
        times += 1;
    }
    (value, times)
}

/// Whether `raw` is already written as [`format_bytes`] writes its value.
pub fn is_canonical(raw: &str) -> bool {
    parse_bytes(raw).is_some_and(|bytes| format_bytes(bytes) == raw)
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

    /// The forms Kubernetes' own `resource.Quantity` produces (binary SI),
    /// as the API server stores them.
    #[test]
    fn bytes_are_written_as_kubernetes_writes_them() {
        let cases = [
            (107_374_182_400, "100Gi"),
            (32_208_060_416, "30716Mi"),
            (1536, "1536"),
            (1_536_000, "1500Ki"),
            (1000, "1k"),
            (1_000_000_000_000, "976562500Ki"),
            (1 << 40, "1Ti"),
            (5_368_709_121, "5368709121"),
            (0, "0"),
            (1, "1"),
            (100, "100"),
            (1023, "1023"),
            (1024, "1Ki"),
            (1025, "1025"),
            // Binary SI writes "2000"; the API server reads decimal SI and keeps "2k".
            (2000, "2k"),
            (3_000_000, "3M"),
            (20_000, "20k"),
            (7 << 60, "7Ei"),
            (i64::MAX, "9223372036854775807"),
            (-1536, "-1536"),
            (-(1 << 30), "-1Gi"),
            (-1000, "-1k"),
        ];
        for (bytes, want) in cases {
            assert_eq!(format_bytes(bytes), want, "{bytes}");
        }
        assert_eq!(format_bytes(i64::MIN), "-8Ei");
    }

    #[test]
    fn canonical_means_written_as_volplane_writes_it() {
        assert!(is_canonical("100Gi") && is_canonical("2k") && is_canonical("0"));
        assert!(!is_canonical("107374182400") && !is_canonical("2000") && !is_canonical("1024Mi"));
        assert!(!is_canonical("garbage"));
    }

    proptest::proptest! {
        #[test]
        fn every_value_round_trips(bytes in proptest::num::i64::ANY) {
            let written = format_bytes(bytes);
            proptest::prop_assert_eq!(parse_bytes(&written), Some(bytes), "{}", written);
            proptest::prop_assert!(is_canonical(&written));
        }

        #[test]
        fn capacities_round_trip(gib in 0i64..1 << 20, extra in 0i64..1 << 30) {
            let bytes = (gib << 30) + extra;
            proptest::prop_assert_eq!(parse_bytes(&format_bytes(bytes)), Some(bytes));
        }
    }
}
