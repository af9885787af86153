//! SQL text for spans: literals replaced by `?` (the shape stays readable, the values stay on
//! the host), comments dropped, `$1` parameters kept; plus the operation, the single table
//! (when there is exactly one) and the OpenTelemetry query summary.

/// Longest sanitized text exported; longer statements are cut at a token boundary with `...`.
pub const MAX_QUERY_TEXT: usize = 2048;

/// Returns `sql` with every literal replaced by `?` and comments removed. Lists of literals
/// collapse: `IN (1, 2, 3)` becomes `IN (?)`.
pub fn sanitize(sql: &str) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len().min(MAX_QUERY_TEXT));
    let mut i = 0;
    let mut pending_space = false;
    while i < b.len() && out.len() < MAX_QUERY_TEXT {
        let c = b[i];
        // Whitespace and comments collapse to one space.
        if c.is_ascii_whitespace() {
            pending_space = !out.is_empty();
            i += 1;
            continue;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            pending_space = !out.is_empty();
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i = skip_block_comment(b, i);
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        // String literals: '...', E'...', X'...', B'...', N'...', with '' escapes.
        let prefixed = matches!(c, b'E' | b'e' | b'X' | b'x' | b'B' | b'b' | b'N' | b'n' | b'U' | b'u')
            && b.get(i + 1) == Some(&b'\'')
            && !prev_is_ident(b, i);
        if c == b'\'' || prefixed {
            i = skip_quoted(b, if prefixed { i + 1 } else { i }, c == b'E' || c == b'e');
            push_literal(&mut out);
            continue;
        }
        // Dollar-quoted strings: $tag$ ... $tag$ (but $1 is a parameter).
        if c == b'$'
            && let Some(end) = dollar_quote_end(b, i)
        {
            i = end;
            push_literal(&mut out);
            continue;
        }
        if c == b'$' && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            let start = i;
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            out.push_str(&sql[start..i]);
            continue;
        }
        // Quoted identifiers stay as they are.
        if c == b'"' {
            let start = i;
            i = skip_until_quote(b, i, b'"');
            out.push_str(&sql[start..i]);
            continue;
        }
        // Numbers that are not part of an identifier.
        if (c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))) && !prev_is_ident(b, i) {
            i = skip_number(b, i);
            push_literal(&mut out);
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] >= 0x80) {
                i += 1;
            }
            let word = &sql[start..i];
            if word.eq_ignore_ascii_case("true")
                || word.eq_ignore_ascii_case("false")
                || word.eq_ignore_ascii_case("null")
            {
                push_literal(&mut out);
            } else {
                out.push_str(word);
            }
            continue;
        }
        out.push(c as char);
        i += 1;
        if c == b')' {
            collapse_list(&mut out);
        }
    }
    if i < b.len() {
        out.push_str("...");
    }
    out
}

fn push_literal(out: &mut String) {
    out.push('?');
}

/// `(?, ?, ?)` -> `(?)` once the closing parenthesis is written.
fn collapse_list(out: &mut String) {
    let Some(open) = out.rfind('(') else { return };
    let inner = &out[open + 1..out.len() - 1];
    let is_list = !inner.is_empty() && inner.split(',').all(|p| p.trim() == "?") && inner.contains(',');
    if is_list {
        out.truncate(open);
        out.push_str("(?)");
    }
}

fn prev_is_ident(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'$' || b[i - 1] >= 0x80)
}

fn skip_block_comment(b: &[u8], mut i: usize) -> usize {
    // PostgreSQL block comments nest.
    let mut depth = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    i
}

/// From an opening quote at `i`, past the closing one (doubled quotes are escapes; with
/// `backslash`, so is `\'`).
fn skip_quoted(b: &[u8], i: usize, backslash: bool) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        if backslash && b[j] == b'\\' {
            j += 2;
            continue;
        }
        if b[j] == b'\'' {
            if b.get(j + 1) == Some(&b'\'') {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    b.len()
}

fn skip_until_quote(b: &[u8], i: usize, q: u8) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        if b[j] == q {
            if b.get(j + 1) == Some(&q) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    b.len()
}

fn dollar_quote_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
        if j == i + 1 && b[j].is_ascii_digit() {
            return None;
        }
        j += 1;
    }
    if b.get(j) != Some(&b'$') {
        return None;
    }
    let tag = &b[i..=j];
    let body = j + 1;
    let pos = b[body..].windows(tag.len()).position(|w| w == tag)?;
    Some(body + pos + tag.len())
}

fn skip_number(b: &[u8], mut i: usize) -> usize {
    if b[i] == b'0' && matches!(b.get(i + 1), Some(b'x' | b'X')) {
        i += 2;
        while i < b.len() && b[i].is_ascii_hexdigit() {
            i += 1;
        }
        return i;
    }
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.' || b[i] == b'_') {
        i += 1;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        let mut j = i + 1;
        if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            i = j;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    i
}

/// What a statement does, for span names and attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Statement {
    /// `SELECT`, `INSERT`, ... upper case; None when the text starts with no keyword.
    pub operation: Option<String>,
    /// The one table the statement touches, when there is exactly one.
    pub collection: Option<String>,
}

const TABLE_VERBS: [&str; 4] = ["SELECT", "INSERT", "UPDATE", "DELETE"];

/// Reads the operation and single table from (sanitized or raw) SQL.
pub fn describe(sql: &str) -> Statement {
    let words = tokens(sql);
    let Some(first) = words.first() else {
        return Statement::default();
    };
    let mut op = first.to_ascii_uppercase();
    let mut rest: &[String] = &words[1..];
    if op == "WITH" {
        // The main statement is the first verb outside the CTE definitions.
        let (verb, after) = main_verb_after_ctes(&words[1..]);
        match verb {
            Some(v) => {
                op = v;
                rest = after;
            }
            None => {
                return Statement { operation: Some(op), collection: None };
            }
        }
    }
    if !op.bytes().all(|c| c.is_ascii_alphabetic()) {
        return Statement::default();
    }
    let collection = match op.as_str() {
        "SELECT" | "DELETE" => single_table_after(rest, "FROM"),
        "INSERT" => single_table_after(rest, "INTO"),
        "UPDATE" => rest.first().filter(|t| is_identifier(t)).map(|t| clean_ident(t)),
        "COPY" | "TRUNCATE" => {
            let r: Vec<&String> =
                rest.iter().filter(|w| !w.eq_ignore_ascii_case("TABLE") && !w.eq_ignore_ascii_case("ONLY")).collect();
            r.first().filter(|t| is_identifier(t)).map(|t| clean_ident(t))
        }
        _ => None,
    };
    Statement { operation: Some(op), collection }
}

/// `{operation} {collection}`, `{operation}`, or None.
pub fn summary(s: &Statement) -> Option<String> {
    match (&s.operation, &s.collection) {
        (Some(op), Some(t)) => Some(format!("{op} {t}")),
        (Some(op), None) => Some(op.clone()),
        _ => None,
    }
}

fn main_verb_after_ctes(words: &[String]) -> (Option<String>, &[String]) {
    let mut depth = 0i32;
    for (i, w) in words.iter().enumerate() {
        match w.as_str() {
            "(" => depth += 1,
            ")" => depth -= 1,
            _ if depth == 0 && TABLE_VERBS.iter().any(|v| w.eq_ignore_ascii_case(v)) => {
                return (Some(w.to_ascii_uppercase()), &words[i + 1..]);
            }
            _ => {}
        }
    }
    (None, &[])
}

/// The table after `keyword` at depth 0, if the statement names exactly one (no joins, no
/// comma lists, no subquery as source).
fn single_table_after(words: &[String], keyword: &str) -> Option<String> {
    let mut depth = 0i32;
    let mut found: Option<usize> = None;
    for (i, w) in words.iter().enumerate() {
        match w.as_str() {
            "(" => depth += 1,
            ")" => depth -= 1,
            _ if depth == 0 && w.eq_ignore_ascii_case(keyword) && found.is_none() => found = Some(i),
            _ => {}
        }
    }
    let start = found? + 1;
    let table = words.get(start)?;
    if !is_identifier(table) {
        return None;
    }
    // Anything that adds a second source disqualifies.
    let mut depth = 0i32;
    for w in &words[start + 1..] {
        match w.as_str() {
            "(" => depth += 1,
            ")" => depth -= 1,
            "," if depth == 0 => return None,
            _ if depth == 0 && w.eq_ignore_ascii_case("JOIN") => return None,
            _ if depth == 0 && (w.eq_ignore_ascii_case("WHERE") || w.eq_ignore_ascii_case("VALUES")) => {
                break;
            }
            _ => {}
        }
    }
    Some(clean_ident(table))
}

fn is_identifier(w: &str) -> bool {
    let first = w.as_bytes().first().copied().unwrap_or(b'0');
    (first.is_ascii_alphabetic() || first == b'_' || first == b'"')
        && !["SELECT", "LATERAL", "ONLY"].iter().any(|k| w.eq_ignore_ascii_case(k))
}

fn clean_ident(w: &str) -> String {
    w.trim_end_matches(';').to_owned()
}

/// Words, quoted identifiers, and single punctuation marks (enough for the shapes above).
fn tokens(sql: &str) -> Vec<String> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() && out.len() < 4096 {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i = skip_block_comment(b, i);
        } else if c == b'\'' {
            i = skip_quoted(b, i, false);
            out.push("?".into());
        } else if c == b'"' {
            let s = i;
            i = skip_until_quote(b, i, b'"');
            out.push(sql[s..i].to_owned());
        } else if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80 {
            let s = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] == b'.' || b[i] >= 0x80)
            {
                i += 1;
            }
            out.push(sql[s..i].to_owned());
        } else {
            out.push((c as char).to_string());
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_become_placeholders() {
        for (raw, clean) in [
            ("SELECT * FROM users WHERE id = 42", "SELECT * FROM users WHERE id = ?"),
            (
                "select name from t where email = 'a@b.c' and pw='s3''cret'",
                "select name from t where email = ? and pw=?",
            ),
            ("SELECT * FROM t WHERE id IN (1, 2, 3)", "SELECT * FROM t WHERE id IN (?)"),
            ("INSERT INTO t (a, b) VALUES ('x', 1.5e3), ('y', -2)", "INSERT INTO t (a, b) VALUES (?), (?, -?)"),
            ("UPDATE t SET a = $1 WHERE b = $2", "UPDATE t SET a = $1 WHERE b = $2"),
            ("SELECT $$secret body$$, $tag$x$tag$", "SELECT ?, ?"),
            ("SELECT E'it\\'s', X'ff', true, NULL", "SELECT ?, ?, ?, ?"),
            ("SELECT t1.col2 FROM \"Tab 1\" t1 -- where pw='x'\n LIMIT 10", "SELECT t1.col2 FROM \"Tab 1\" t1 LIMIT ?"),
            ("SELECT /* token=abc /* nested */ */ 1", "SELECT ?"),
            ("SELECT 0x1F + .5", "SELECT ? + ?"),
        ] {
            assert_eq!(sanitize(raw), clean, "{raw}");
        }
    }

    #[test]
    fn long_statements_are_cut() {
        let long = format!("SELECT {}", "a, ".repeat(2000));
        let s = sanitize(&long);
        assert!(s.len() <= MAX_QUERY_TEXT + 3 && s.ends_with("..."));
    }

    #[test]
    fn operations_tables_and_summaries() {
        for (sql, op, table) in [
            ("SELECT abalance FROM pgbench_accounts WHERE aid = $1;", "SELECT", Some("pgbench_accounts")),
            ("select * from a join b on a.id = b.id", "SELECT", None),
            ("SELECT * FROM a, b", "SELECT", None),
            ("SELECT 1", "SELECT", None),
            ("SELECT * FROM (SELECT 1) x", "SELECT", None),
            ("SELECT count(*) FROM users WHERE x IN (SELECT y FROM z)", "SELECT", Some("users")),
            ("insert into orders (a) values ($1)", "INSERT", Some("orders")),
            ("UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2", "UPDATE", Some("pgbench_tellers")),
            ("DELETE FROM sessions WHERE expires < now()", "DELETE", Some("sessions")),
            ("WITH x AS (SELECT * FROM a) SELECT * FROM x", "SELECT", Some("x")),
            ("COPY items FROM STDIN", "COPY", Some("items")),
            ("BEGIN", "BEGIN", None),
            ("create table t (a int)", "CREATE", None),
        ] {
            let d = describe(sql);
            assert_eq!(d.operation.as_deref(), Some(op), "{sql}");
            assert_eq!(d.collection.as_deref(), table, "{sql}");
        }
        assert_eq!(summary(&describe("SELECT * FROM users WHERE id = ?")), Some("SELECT users".into()));
        assert_eq!(summary(&describe("")), None);
        assert_eq!(describe("  ").operation, None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_never_leaks_quoted_text(s in ".{0,200}", secret in "[a-z]{12}") {
            let _ = sanitize(&s);
            let _ = describe(&s);
            let q = format!("SELECT * FROM t WHERE a = '{secret}' AND b = {}", secret.len());
            proptest::prop_assert!(!sanitize(&q).contains(&secret));
        }
    }
}
