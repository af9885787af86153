//! Just enough of PromQL's lexical structure to list the metric names and label names an
//! expression uses, so dashboards and rules can be checked against what sonde exports.

use std::collections::BTreeSet;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub metrics: BTreeSet<String>,
    pub labels: BTreeSet<String>,
}

const KEYWORDS: &[&str] = &["and", "or", "unless", "offset", "bool", "inf", "nan"];
/// Aggregation operators, which may be followed by `by (...)` before their parentheses.
const AGGREGATIONS: &[&str] =
    &["sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Metric and label names in `expr`. Grafana variables (`$service`, `$__rate_interval`) and
/// string contents are skipped.
pub fn names(expr: &str) -> Names {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Names::default();
    let mut i = 0;
    let mut in_braces = false;
    let mut in_brackets = false;
    let mut label_list_depth: Option<usize> = None;
    let mut paren_depth = 0usize;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                continue;
            }
            '{' => in_braces = true,
            '}' => in_braces = false,
            '[' => in_brackets = true,
            ']' => in_brackets = false,
            '(' => paren_depth += 1,
            ')' => {
                if label_list_depth == Some(paren_depth) {
                    label_list_depth = None;
                }
                paren_depth = paren_depth.saturating_sub(1);
            }
            '$' => {
                i += 1;
                while i < chars.len() && (is_ident(chars[i]) || chars[i] == '{' || chars[i] == '}') {
                    i += 1;
                }
                continue;
            }
            _ if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations (0.95, 5m, 1e3).
                while i < chars.len() && (is_ident(chars[i]) || chars[i] == '.') {
                    i += 1;
                }
                continue;
            }
            _ if is_ident_start(c) => {
                let start = i;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace()).copied();
                if in_brackets {
                    continue;
                }
                if in_braces || label_list_depth.is_some() {
                    out.labels.insert(word);
                } else if LABEL_LIST_KEYWORDS.contains(&word.as_str()) {
                    if next == Some('(') {
                        label_list_depth = Some(paren_depth + 1);
                    }
                } else if next == Some('(')
                    || AGGREGATIONS.contains(&word.as_str())
                    || KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                {
                    // A function or aggregation, or an operator keyword.
                } else {
                    out.metrics.insert(word);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Sample names and label names in Prometheus text (or OpenMetrics) exposition.
pub fn exposition_names(text: &str) -> Names {
    let mut out = Names::default();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        out.metrics.insert(line[..name_end].to_owned());
        if let (Some(open), Some(close)) = (line.find('{'), line.rfind('}')) {
            let mut rest = &line[open + 1..close];
            while let Some(eq) = rest.find("=\"") {
                out.labels.insert(rest[..eq].trim_start_matches(',').trim().to_owned());
                let value_and_more = &rest[eq + 2..];
                let mut end = 0;
                let bytes = value_and_more.as_bytes();
                while end < bytes.len() && bytes[end] != b'"' {
                    end += if bytes[end] == b'\\' { 2 } else { 1 };
                }
                rest = value_and_more.get(end + 1..).unwrap_or("");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_metrics_and_labels() {
        let n = names(
            r#"histogram_quantile(0.95, sum by (le, service_name) (rate(http_server_request_duration_seconds_bucket{service_name=~"$service", error_type!=""}[$__rate_interval]))) / on(instance) group_left(job) up{job="sonde"} > 1"#,
        );
        assert_eq!(n.metrics, set(&["http_server_request_duration_seconds_bucket", "up"]));
        assert_eq!(n.labels, set(&["le", "service_name", "error_type", "instance", "job"]));
        let n = names("increase(sonde_events_lost_total[5m]) > 0 and sonde_traced_processes");
        assert_eq!(n.metrics, set(&["sonde_events_lost_total", "sonde_traced_processes"]));
        let n = names("sum(rate(x_total{$$__tags}[5m]))");
        assert_eq!(n.metrics, set(&["x_total"]));
        assert!(n.labels.is_empty());
    }

    #[test]
    fn reads_exposition() {
        let n = exposition_names(
            "# TYPE a counter\na_total{x=\"1\",y=\"a\\\"b,c=\\\"d\"} 3\nb_bucket{le=\"0.5\"} 1\nc 2\n# EOF\n",
        );
        assert_eq!(n.metrics, set(&["a_total", "b_bucket", "c"]));
        assert_eq!(n.labels, set(&["x", "y", "le"]));
    }
}
