//! Credentials in log lines, replaced before a record leaves the process: values of
//! `Authorization`/`Cookie` headers, `Bearer`/`Basic` tokens, `password=`-style key-value pairs
//! and the password of `scheme://user:password@host` URLs, plus the operator's own rules.

use regex::{Regex, RegexSet};

/// What a redacted value becomes.
pub const REDACTED: &str = "[REDACTED]";

/// Built-in rules: group 1 is the secret. Case-insensitive; keys may carry a prefix
/// (`db_password`, `X-Api-Key`) and be quoted (JSON, YAML).
const DEFAULT_RULES: [&str; 5] = [
    r#"(?i)\b(?:proxy-)?authorization(?:\\?["'])?\s*[:=]\s*(?:\\?["'])?([^"'\\\r\n]+)"#,
    r#"(?i)\b(?:set-)?cookie(?:\\?["'])?\s*[:=]\s*(?:\\?["'])?([^"'\\\r\n]+)"#,
    r"(?i)\b(?:bearer|basic)\s+([A-Za-z0-9._~+/-]+=*)",
    r#"(?i)[A-Za-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key)(?:\\?["'])?\s*[=:]\s*(?:\\?["'])?([^\s"'&,;}\\]+)"#,
    r"(?i)\b[a-z][a-z0-9+.-]*://[^/\s:@]+:([^/\s@]+)@",
];

/// Replaces what every rule matches: its first capture group when it has one, else the whole
/// match. A set of all rules answers "nothing to redact" for most lines in one pass.
#[derive(Debug)]
pub struct Redactor {
    any: RegexSet,
    rules: Vec<Regex>,
}

impl Redactor {
    /// The built-in rules (when `defaults`) and `extra`; an invalid extra rule is reported with
    /// its index.
    pub fn new(defaults: bool, extra: &[String]) -> Result<Self, (usize, String)> {
        let mut patterns: Vec<String> =
            if defaults { DEFAULT_RULES.iter().map(|s| s.to_string()).collect() } else { Vec::new() };
        for (i, p) in extra.iter().enumerate() {
            Regex::new(p).map_err(|e| (i, format!("{p:?} is not a valid regular expression: {e}")))?;
            patterns.push(p.clone());
        }
        let rules = patterns.iter().map(|p| Regex::new(p).expect("checked above")).collect();
        let any = RegexSet::new(&patterns).map_err(|e| (0, e.to_string()))?;
        Ok(Self { any, rules })
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Redacts `text` in place; returns how many values were replaced.
    pub fn redact(&self, text: &mut String) -> u64 {
        let hits = self.any.matches(text);
        if !hits.matched_any() {
            return 0;
        }
        let mut replaced = 0;
        for i in hits.iter() {
            let rule = &self.rules[i];
            let mut out = String::with_capacity(text.len());
            let mut last = 0;
            for caps in rule.captures_iter(text) {
                let Some(m) = caps.get(1).or_else(|| caps.get(0)) else { continue };
                if m.as_str() == REDACTED || m.is_empty() {
                    continue;
                }
                out.push_str(&text[last..m.start()]);
                out.push_str(REDACTED);
                last = m.end();
                replaced += 1;
            }
            if last > 0 {
                out.push_str(&text[last..]);
                *text = out;
            }
        }
        replaced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redacted(line: &str) -> (String, u64) {
        let r = Redactor::new(true, &[]).unwrap();
        let mut s = line.to_string();
        let n = r.redact(&mut s);
        (s, n)
    }

    #[test]
    fn default_rules_cover_the_usual_credentials() {
        for (line, secret) in [
            ("GET / Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9"),
            ("headers={'authorization': 'Basic dXNlcjpwYXNz'}", "dXNlcjpwYXNz"),
            ("calling with bearer abc.def-ghi", "abc.def-ghi"),
            ("login user=bob password=hunter2 ok", "hunter2"),
            ("db_passwd=s3cr3t&x=1", "s3cr3t"),
            ("{\"client_secret\": \"shh-123\", \"n\": 1}", "shh-123"),
            ("X-Api-Key: k-999", "k-999"),
            ("token=abc123;path=/", "abc123"),
            ("api_key=ZZZ", "ZZZ"),
            ("connecting to postgres://app:pa55word@db:5432/x", "pa55word"),
            ("Cookie: session=deadbeef", "deadbeef"),
            (r#"{"msg": "{\"client_secret\": \"nested-1\"}"}"#, "nested-1"),
            (r#"{"msg": "Authorization: Bearer tok-in-json"}"#, "tok-in-json"),
        ] {
            let (out, n) = redacted(line);
            assert!(n >= 1, "{line}");
            assert!(!out.contains(secret), "{line} -> {out}");
            assert!(out.contains(REDACTED), "{out}");
        }
    }

    #[test]
    fn ordinary_lines_are_untouched() {
        for line in ["GET /items/7 200 12ms", "user bob logged in", "postgres://db:5432/x", "tokens: 12 used"] {
            assert_eq!(redacted(line), (line.to_string(), 0), "{line}");
        }
    }

    #[test]
    fn operator_rules_replace_their_group_or_match() {
        let r = Redactor::new(false, &["ssn=(\\d+)".into(), "CARD-\\d{4}".into()]).unwrap();
        let mut s = "ssn=123456 paid with CARD-4242 password=kept".to_string();
        assert_eq!(r.redact(&mut s), 2);
        assert_eq!(s, "ssn=[REDACTED] paid with [REDACTED] password=kept");
        assert_eq!(Redactor::new(true, &["(".into()]).unwrap_err().0, 0);
    }
}
