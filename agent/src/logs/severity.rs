//! The severity a log line states: a JSON record's `level`/`severity` field, a syslog `<N>`
//! priority, a logfmt `level=` pair, or a level word near the start of a text line (`ERROR`,
//! `[warn]`, Python's `WARNING:root:`). Mapped to OpenTelemetry's severity numbers; the text is
//! kept as written. No stated level means no severity (stderr is not taken as an error).

use std::borrow::Cow;

use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, SeqAccess, Visitor},
};

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

/// A level field's value, borrowed from the record where it has no escapes.
enum LevelValue<'a> {
    Text(Cow<'a, str>),
    Integer(i64),
    /// A fractional number: not a level (the record has no severity).
    Fraction,
    /// Anything else: the next level field is tried.
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for LevelValue<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Level<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Level<'a> {
            type Value = LevelValue<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(LevelValue::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(LevelValue::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(LevelValue::Integer(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(i64::try_from(v).map_or(LevelValue::Fraction, LevelValue::Integer))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(LevelValue::Fraction)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(LevelValue::Other)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(LevelValue::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(LevelValue::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(LevelValue::Other)
            }
        }
        d.deserialize_any(Level(std::marker::PhantomData))
    }
}

/// The level fields of a JSON record, in the order they are tried; every other field is
/// skipped without being built.
#[derive(Deserialize)]
struct LevelFields<'a> {
    #[serde(borrow)]
    level: Option<LevelValue<'a>>,
    #[serde(borrow)]
    severity: Option<LevelValue<'a>>,
    #[serde(borrow)]
    levelname: Option<LevelValue<'a>>,
    #[serde(borrow, rename = "log.level")]
    log_level: Option<LevelValue<'a>>,
    #[serde(borrow)]
    lvl: Option<LevelValue<'a>>,
    #[serde(borrow)]
    loglevel: Option<LevelValue<'a>>,
}

/// From a JSON record's level field; numeric levels follow pino/bunyan (10 trace … 60 fatal).
/// Err when the text is not a JSON object.
pub fn from_json(record: &str) -> Result<Option<Severity>, serde_json::Error> {
    let fields: LevelFields<'_> = serde_json::from_str(record)?;
    let LevelFields { level, severity, levelname, log_level, lvl, loglevel } = fields;
    for value in [level, severity, levelname, log_level, lvl, loglevel].into_iter().flatten() {
        match value {
            LevelValue::Text(s) => return Ok(named(s.trim())),
            LevelValue::Integer(n) => {
                let number = match n {
                    ..=10 => 1,
                    11..=20 => 5,
                    21..=30 => 9,
                    31..=40 => 13,
                    41..=50 => 17,
                    _ => 21,
                };
                return Ok(Some(Severity { number, text: n.to_string() }));
            }
            LevelValue::Fraction => return Ok(None),
            LevelValue::Other => {}
        }
    }
    Ok(None)
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
        let obj = |s: &str| from_json(s).unwrap();
        assert_eq!(obj(r#"{"level":"error","msg":"x"}"#).map(|s| s.number), Some(17));
        assert_eq!(obj(r#"{"severity":"WARNING"}"#).map(|s| s.number), Some(13));
        assert_eq!(obj(r#"{"level":50}"#).map(|s| s.number), Some(17));
        assert_eq!(obj(r#"{"levelname":"INFO"}"#).map(|s| s.text), Some("INFO".into()));
        assert_eq!(obj(r#"{"msg":"no level"}"#), None);
        // Fields are tried in order; a value that is no level moves on, a fraction ends it.
        assert_eq!(obj(r#"{"lvl":"warn","level":{"n":1},"x":[1,{"y":2}]}"#).map(|s| s.number), Some(13));
        assert_eq!(obj(r#"{"level":1.5,"severity":"error"}"#), None);
        assert_eq!(obj(r#"{"log.level":"ERROR"}"#).map(|s| s.text), Some("ERROR".into()));
        // An escaped value is unescaped before it is read.
        assert_eq!(obj(r#"{"level":"\u0065rror"}"#).map(|s| s.number), Some(17));
        assert!(from_json(r#"{"level":"error""#).is_err());
    }
}
