//! The two exposition formats `/metrics` answers in, and which one a
//! scraper asked for (its `Accept` header). Pure: no I/O.
//!
//! The registry encodes OpenMetrics; the Prometheus text format 0.0.4 is
//! derived from it line by line. They differ only in metadata: 0.0.4 names
//! a counter's family after its `_total` sample, knows no `info` or `unit`,
//! and has no `# EOF`.

/// An exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4: the default.
    Text,
    /// OpenMetrics 1.0.0.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format a scraper sending `accept` prefers (RFC 9110): each
    /// format's quality is that of the most specific media range naming it
    /// (`text/plain` over `text/*` over `*/*`); the higher wins, the text
    /// format on a tie, without a header, or when nothing in it is known.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let ranges: Vec<(&str, &str, f32)> = accept.unwrap_or_default().split(',').filter_map(media_range).collect();
        let quality = |format: Self| {
            let (kind, subtype) = format.media_type();
            ranges
                .iter()
                .filter_map(|&(k, sub, q)| {
                    let specificity = match (k, sub) {
                        _ if k.eq_ignore_ascii_case(kind) && sub.eq_ignore_ascii_case(subtype) => 2,
                        (_, "*") if k.eq_ignore_ascii_case(kind) => 1,
                        ("*", "*") => 0,
                        _ => return None,
                    };
                    Some((specificity, q))
                })
                .max_by_key(|&(specificity, _)| specificity)
                .map_or(0.0, |(_, q)| q)
        };
        if quality(Self::OpenMetrics) > quality(Self::Text) {
            Self::OpenMetrics
        } else {
            Self::Text
        }
    }

    fn media_type(self) -> (&'static str, &'static str) {
        match self {
            Self::Text => ("text", "plain"),
            Self::OpenMetrics => ("application", "openmetrics-text"),
        }
    }

    /// `openmetrics` (as the registry encodes it) in this format.
    pub fn render(self, openmetrics: &str) -> String {
        match self {
            Self::OpenMetrics => openmetrics.to_string(),
            Self::Text => text_from_openmetrics(openmetrics),
        }
    }
}

/// Type, subtype and quality of one media range of an `Accept` header;
/// `None` for one that is not `type/subtype` or has a bad quality.
fn media_range(range: &str) -> Option<(&str, &str, f32)> {
    let mut parts = range.split(';').map(str::trim);
    let (kind, subtype) = parts.next()?.split_once('/')?;
    let mut q = 1.0;
    for parameter in parts {
        let Some((name, value)) = parameter.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("q") {
            q = value.trim().parse::<f32>().ok().filter(|q| (0.0..=1.0).contains(q))?;
        }
    }
    Some((kind.trim(), subtype.trim(), q))
}

/// OpenMetrics text as Prometheus text format 0.0.4.
fn text_from_openmetrics(openmetrics: &str) -> String {
    let mut text = String::with_capacity(openmetrics.len());
    // A family's `# HELP` comes before its `# TYPE`, which decides its name.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                _ => (name.to_string(), "untyped"),
            };
            if let Some((_, description)) = help.take() {
                text.push_str(&format!("# HELP {name} {description}\n"));
            }
            text.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Prometheus 2.x sends.
    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn the_text_format_unless_openmetrics_is_preferred() {
        for (accept, expected) in [
            (None, Format::Text),
            (Some(""), Format::Text),
            (Some("*/*"), Format::Text),
            (Some("text/plain;version=0.0.4"), Format::Text),
            (Some("application/json"), Format::Text),
            (Some(PROMETHEUS_ACCEPT), Format::OpenMetrics),
            (Some("application/openmetrics-text; version=1.0.0"), Format::OpenMetrics),
            (
                Some("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"),
                Format::Text,
            ),
            (Some("application/openmetrics-text;q=0,text/plain;q=0.2"), Format::Text),
            (
                Some("text/plain;q=0.3, APPLICATION/OpenMetrics-Text"),
                Format::OpenMetrics,
            ),
            // A quality that is no number is no preference.
            (Some("application/openmetrics-text;q=high"), Format::Text),
            // The most specific range decides.
            (Some("text/plain;q=0, */*"), Format::OpenMetrics),
            (Some("application/*"), Format::OpenMetrics),
            (Some("application/*;q=0.4, text/*;q=0.3"), Format::OpenMetrics),
            (Some("*/*;q=0.9, application/openmetrics-text;q=0.1"), Format::Text),
            (
                Some("application/openmetrics-text, application/*;q=0"),
                Format::OpenMetrics,
            ),
        ] {
            assert_eq!(Format::negotiate(accept), expected, "Accept: {accept:?}");
        }
    }

    #[test]
    fn the_text_format_names_counters_by_their_samples_and_has_no_eof() {
        let openmetrics = "\
# HELP volplane_api_retries API requests retried.
# TYPE volplane_api_retries counter
volplane_api_retries_total{verb=\"GET\",code=\"429\"} 3
# HELP volplane_capacity_objects_desired objects that should exist.
# TYPE volplane_capacity_objects_desired gauge
volplane_capacity_objects_desired 4
# HELP build Build.
# TYPE build info
build_info{version=\"1\"} 1
# HELP h Latency.
# TYPE h histogram
# UNIT h seconds
h_bucket{le=\"+Inf\"} 1
h_sum 0.5
h_count 1
# TYPE odd unknown
odd 1
# EOF
";
        let expected = "\
# HELP volplane_api_retries_total API requests retried.
# TYPE volplane_api_retries_total counter
volplane_api_retries_total{verb=\"GET\",code=\"429\"} 3
# HELP volplane_capacity_objects_desired objects that should exist.
# TYPE volplane_capacity_objects_desired gauge
volplane_capacity_objects_desired 4
# HELP build_info Build.
# TYPE build_info gauge
build_info{version=\"1\"} 1
# HELP h Latency.
# TYPE h histogram
h_bucket{le=\"+Inf\"} 1
h_sum 0.5
h_count 1
# TYPE odd untyped
odd 1
";
        assert_eq!(Format::Text.render(openmetrics), expected);
        assert_eq!(Format::OpenMetrics.render(openmetrics), openmetrics);
    }
}
