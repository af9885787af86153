//! `http.route` without application knowledge: a low-cardinality template of the path in which
//! segments that look like identifiers become placeholders.

use super::span::Text;

/// Turns `/users/42/orders/9f1c...` into `/users/{id}/orders/{id}`.
///
/// A segment becomes `{id}` when it is numeric, a UUID, a long hex string, or mixes letters and
/// digits with 16 or more characters (tokens, hashes). The query string is dropped.
pub fn route_of(target: &str) -> Text {
    let path = path_of(target);
    if path.is_empty() || path == "/" {
        return Text::const_new("/");
    }
    let mut out = Text::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if looks_like_id(seg) {
            out.push_str("{id}");
        } else {
            out.push_str(seg);
        }
    }
    out
}

/// The path of a request-target (origin or absolute form), without query or fragment.
pub fn path_of(target: &str) -> &str {
    let without_query = target.split(['?', '#']).next().unwrap_or("");
    if let Some(rest) = without_query.strip_prefix("http://").or_else(|| without_query.strip_prefix("https://")) {
        return rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
    }
    without_query
}

fn looks_like_id(seg: &str) -> bool {
    if seg.is_empty() {
        return false;
    }
    let b = seg.as_bytes();
    if b.iter().all(u8::is_ascii_digit) {
        return true;
    }
    if is_uuid(b) {
        return true;
    }
    let hex = b.iter().all(u8::is_ascii_hexdigit);
    let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
    if hex && b.len() >= 8 && digits > 0 {
        return true;
    }
    let alnum = b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_');
    alnum && b.len() >= 16 && digits > 0
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_become_placeholders() {
        for (target, route) in [
            ("/", "/"),
            ("", "/"),
            ("/users/42", "/users/{id}"),
            ("/users/42/orders/7?x=1", "/users/{id}/orders/{id}"),
            ("/items/3f2504e0-4f89-11d3-9a0c-0305e82c3301", "/items/{id}"),
            ("/blobs/deadbeef12", "/blobs/{id}"),
            ("/session/abcDEF1234567890xyz", "/session/{id}"),
            ("/api/v1/health", "/api/v1/health"),
            ("/static/app.js", "/static/app.js"),
            ("/cafe", "/cafe"),
            ("http://example.com/a/12?q", "/a/{id}"),
            ("http://example.com", "/"),
        ] {
            assert_eq!(route_of(target), route, "{target}");
        }
    }

    #[test]
    fn path_drops_query_and_fragment() {
        assert_eq!(path_of("/a/b?token=secret#frag"), "/a/b");
        assert_eq!(path_of("https://h:1/x?y"), "/x");
    }
}
