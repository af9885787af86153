//! A finished span, independent of any export format.

use std::sync::Arc;

use super::{context::SpanContext, resource::Resource};

/// Span names and string attribute values: short ones (up to 24 bytes: methods, routes, IP
/// addresses, table names) live inline, so building and cloning a span's attributes does not
/// allocate once per value.
pub type Text = compact_str::CompactString;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

impl SpanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AttrValue {
    Str(Text),
    Int(i64),
    Bool(bool),
}

impl From<&str> for AttrValue {
    fn from(v: &str) -> Self {
        AttrValue::Str(Text::from(v))
    }
}

impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        AttrValue::Str(Text::from(v))
    }
}

impl From<Text> for AttrValue {
    fn from(v: Text) -> Self {
        AttrValue::Str(v)
    }
}

impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::Int(v)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Attr {
    pub key: &'static str,
    pub value: AttrValue,
}

impl Attr {
    pub fn new(key: &'static str, value: impl Into<AttrValue>) -> Self {
        Self { key, value: value.into() }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Unset,
    Error(String),
}

#[derive(Clone, Debug)]
pub struct Span {
    pub context: SpanContext,
    pub name: Text,
    pub kind: SpanKind,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<Attr>,
    pub status: Status,
    pub resource: Arc<Resource>,
    /// The metric series that counted it (where its exemplar goes), once measured.
    pub counted_in: Option<crate::metrics::SeriesRef>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.iter().find(|a| a.key == key).map(|a| &a.value)
    }
}
