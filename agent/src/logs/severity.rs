//! The severity a log line states: a JSON record's `level`/`severity` field, a syslog `<N>`
//! priority, a logfmt `level=` pair, or a level word near the start of a text line (`ERROR`,
//! `[warn]`, Python's `WARNING:root:`). Mapped to OpenTelemetry's severity numbers; the text is
//! kept as written. No stated level means no severity (stderr is not taken as an error).

use serde_json::{Map, Value};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Severity {
    /// OpenTelemetry `SeverityNumber` (TRACE 1, DEBUG 5, INFO 9, WARN 13, ERROR 17, FATAL 21).
    pub number: i32,
    pub text: String,
}

/// Level words and their severity numbers (compared ignoring ASCII case).
const LEVELS: [(&str, i32); 16] = [
    ("trace", 1),
    ("debug", 5),
    ("info", 9),
    ("information", 9),
    ("notice", 10),
    ("warn", 13),
    ("warning", 13),
    ("error", 17),
    ("err", 17),
    ("severe", 17),
    ("critical", 21),
    ("crit", 21),
    ("fatal", 21),
    ("panic", 21),
    ("alert", 21),
    ("emerg", 21),
];

fn level_number(word: &str) -> Option<i32> {
    LEVELS.iter().find(|(name, _)| name.eq_ignore_ascii_case(word)).map(|(_, n)| *n)
}

fn named(word: &str) -> Option<Severity> {
    level_number(word).map(|number| Severity { number, text: word.to_string() })
}

/// From a JSON object's level field; numeric levels follow pino/bunyan (10 trace … 60 fatal).
pub fn from_json(object: &Map<String, Value>) -> Option<Severity> {
    for key in ["level", "severity", "levelname", "log.level", "lvl", "loglevel"] {
        match object.get(key) {
            Some(Value::String(s)) => return named(s.trim()),
            Some(Value::Number(n)) => {
                let n = n.as_i64()?;
                let number = match n {
                    ..=10 => 1,
                    11..=20 => 5,
                    21..=30 => 9,
                    31..=40 => 13,
                    41..=50 => 17,
                    _ => 21,
                };
                return Some(Severity { number, text: n.to_string() });
            }
            _ => {}
        }
    }
    None
}

/// From a text line.
pub fn from_text(line: &str) -> Option<Severity> {
    if let Some(s) = syslog_priority(line) {
        return Some(s);
    }
    if let Some(s) = logfmt_level(line) {
        return Some(s);
    }
    // A level word among the first few words: bare words must be upper case (`ERROR`), words
    // in brackets may be any case (`[error]`, nginx).
    for word in line.split_ascii_whitespace().take(4) {
        let bracketed = word.starts_with(['[', '(', '<']);
        let inner = word.trim_matches(|c: char| "[]()<>|,".contains(c));
        // `WARNING:root:message` (Python's default format), `ERROR:`.
        let inner = inner.split(':').next().unwrap_or(inner);
        if inner.is_empty() || !(bracketed || inner.bytes().all(|b| b.is_ascii_uppercase())) {
            continue;
        }
        if let Some(s) = named(inner) {
            return Some(s);
        }
    }
    None
}

/// `<3>message`: the syslog priority's low three bits are the severity (sd-daemon prefixes).
fn syslog_priority(line: &str) -> Option<Severity> {
    let rest = line.strip_prefix('<')?;
    let end = rest.find('>')?;
    let digits = &rest[..end];
    if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let number = match digits.parse::<u32>().ok()? & 7 {
        0..=2 => 21,
        3 => 17,
        4 => 13,
        5 => 10,
        6 => 9,
        _ => 5,
    };
    Some(Severity { number, text: format!("<{digits}>") })
}

/// `level=error` / `lvl=warn` / `severity=info`, as a whole key.
fn logfmt_level(line: &str) -> Option<Severity> {
    for part in line.split_ascii_whitespace() {
        let Some((key, value)) = part.split_once('=') else { continue };
        if matches!(key, "level" | "lvl" | "severity") {
            return named(value.trim_matches('"'));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(line: &str) -> Option<i32> {
        from_text(line).map(|s| s.number)
    }

    #[test]
    fn text_prefixes() {
        assert_eq!(n("ERROR something broke"), Some(17));
        assert_eq!(n("WARNING:root:disk almost full"), Some(13));
        assert_eq!(n("2026-12-03 13:00:01,234 INFO served /x"), Some(9));
        assert_eq!(n("2026/12/03 13:00:00 [error] 12#0: *1 open() failed"), Some(17));
        assert_eq!(n("[Warn] slow"), Some(13));
        assert_eq!(n("<3>unit failed"), Some(17));
        assert_eq!(n("<6>started"), Some(9));
        assert_eq!(n("ts=1 level=debug msg=hi"), Some(5));
        assert_eq!(n("CRITICAL:app:out of memory"), Some(21));
        let s = from_text("DEBUG x").unwrap();
        assert_eq!(s.text, "DEBUG");
    }

    #[test]
    fn no_stated_level_is_no_severity() {
        for line in ["GET /error 500", "an error occurred", "127.0.0.1 - - \"GET /INFO\" 200", "Error-prone", ""] {
            assert_eq!(n(line), None, "{line}");
        }
    }

    #[test]
    fn json_fields() {
        let obj = |s: &str| serde_json::from_str::<Map<String, Value>>(s).unwrap();
        assert_eq!(from_json(&obj(r#"{"level":"error","msg":"x"}"#)).map(|s| s.number), Some(17));
        assert_eq!(from_json(&obj(r#"{"severity":"WARNING"}"#)).map(|s| s.number), Some(13));
        assert_eq!(from_json(&obj(r#"{"level":50}"#)).map(|s| s.number), Some(17));
        assert_eq!(from_json(&obj(r#"{"levelname":"INFO"}"#)).map(|s| s.text), Some("INFO".into()));
        assert_eq!(from_json(&obj(r#"{"msg":"no level"}"#)), None);
    }
}
