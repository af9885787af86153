//! HPACK header-block decoding (RFC 7541) for an observer: one [`Decoder`] per direction follows
//! the sender's dynamic table. A field that refers to a table entry sonde never saw (the
//! connection was seen mid-stream, or part of a block was not captured) is reported as
//! undecodable, never guessed.
//!
//! Why lookups stay exact without knowing the table's size: the table is first-in first-out, so
//! the entries sonde saw inserted are always its newest. Index 62 + j names the j-th newest
//! entry; while j is below the number of entries sonde saw inserted, that entry is one of them.
//! Eviction only bounds sonde's memory: an index the sender uses is never one it evicted.

use std::collections::VecDeque;

/// The static table (RFC 7541 Appendix A), index 1 first.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The table size both ends start with (RFC 9113 SETTINGS_HEADER_TABLE_SIZE default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;
/// The most table bytes sonde keeps per direction, whatever size the sender announces; a
/// reference to an entry beyond it is undecodable (counted), not wrong.
pub const MAX_TRACKED_TABLE_BYTES: usize = 65536;
/// Per-entry overhead RFC 7541 section 4.1 counts.
const ENTRY_OVERHEAD: usize = 32;
/// Integers longer than this are malformed (RFC 7541 allows any size; no real field needs it).
const MAX_INTEGER: u64 = 1 << 28;

/// One dynamic-table entry; `None` parts were never seen (inserted with a name sonde could not
/// resolve).
#[derive(Clone, Debug)]
struct Entry {
    name: Option<Box<[u8]>>,
    value: Box<[u8]>,
}

impl Entry {
    /// RFC 7541 size; an unknown name counts as empty (a lower bound: the entry is kept longer).
    fn size(&self) -> usize {
        self.name.as_ref().map_or(0, |n| n.len()) + self.value.len() + ENTRY_OVERHEAD
    }
}

/// What one header block gave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockOutcome {
    /// Fields that referred to table entries sonde never saw.
    pub undecodable: u32,
}

/// A header block that is not valid HPACK: the decoder has lost the sender's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

#[derive(Debug)]
pub struct Decoder {
    /// Newest first.
    table: VecDeque<Entry>,
    table_bytes: usize,
    max_size: usize,
    /// Whether sonde saw every insertion since the table was empty.
    complete: bool,
    huffman_buf: Vec<u8>,
}

impl Decoder {
    /// A decoder for a direction seen from its first header block.
    pub fn from_start() -> Self {
        Self {
            table: VecDeque::new(),
            table_bytes: 0,
            max_size: DEFAULT_TABLE_SIZE,
            complete: true,
            huffman_buf: Vec::new(),
        }
    }

    /// A decoder for a direction seen mid-stream: entries inserted before are unknown.
    pub fn mid_stream() -> Self {
        Self { complete: false, ..Self::from_start() }
    }

    /// Whether every table entry the sender can refer to is known.
    #[cfg(test)]
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// Part of a header block was never seen (not captured, or lost): the insertions it made are
    /// unknown, so every entry sonde knows moved by an unknown amount.
    pub fn lose_sync(&mut self) {
        self.table.clear();
        self.table_bytes = 0;
        self.complete = false;
    }

    /// Decodes one whole header block, calling `field(name, value)` for each field it can
    /// decode, in order. On a malformed block the table is lost (see [`Self::lose_sync`]); the
    /// fields before the fault were reported and are right.
    pub fn decode(&mut self, mut block: &[u8], mut field: impl FnMut(&[u8], &[u8])) -> Result<BlockOutcome, Malformed> {
        let mut outcome = BlockOutcome::default();
        while let Some(&first) = block.first() {
            let step = if first & 0x80 != 0 {
                self.indexed(&mut block, &mut field, &mut outcome)
            } else if first & 0xc0 == 0x40 {
                self.literal(&mut block, 6, true, &mut field, &mut outcome)
            } else if first & 0xe0 == 0x20 {
                integer(&mut block, 5).map(|size| self.resize(size as usize))
            } else {
                // Without indexing (0000) or never indexed (0001): the same shape.
                self.literal(&mut block, 4, false, &mut field, &mut outcome)
            };
            if let Err(e) = step {
                self.lose_sync();
                return Err(e);
            }
        }
        Ok(outcome)
    }

    fn indexed(
        &mut self,
        block: &mut &[u8],
        field: &mut impl FnMut(&[u8], &[u8]),
        outcome: &mut BlockOutcome,
    ) -> Result<(), Malformed> {
        let index = integer(block, 7)? as usize;
        match self.lookup(index)? {
            Lookup::Static(name, value) => field(name.as_bytes(), value.as_bytes()),
            Lookup::Dynamic(Entry { name: Some(name), value }) => field(name, value),
            Lookup::Dynamic(_) | Lookup::Unknown => outcome.undecodable += 1,
        }
        Ok(())
    }

    fn literal(
        &mut self,
        block: &mut &[u8],
        prefix_bits: u8,
        insert: bool,
        field: &mut impl FnMut(&[u8], &[u8]),
        outcome: &mut BlockOutcome,
    ) -> Result<(), Malformed> {
        let name_index = integer(block, prefix_bits)? as usize;
        let name: Option<Box<[u8]>> = if name_index == 0 {
            Some(self.string(block)?.into())
        } else {
            match self.lookup(name_index)? {
                Lookup::Static(name, _) => Some(name.as_bytes().into()),
                Lookup::Dynamic(entry) => entry.name.clone(),
                Lookup::Unknown => None,
            }
        };
        let value: Box<[u8]> = self.string(block)?.into();
        match &name {
            Some(name) => field(name, &value),
            None => outcome.undecodable += 1,
        }
        if insert {
            self.insert(Entry { name, value });
        }
        Ok(())
    }

    fn lookup(&self, index: usize) -> Result<Lookup<'_>, Malformed> {
        match index {
            0 => Err(Malformed("index 0")),
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                Ok(Lookup::Static(name, value))
            }
            _ => match self.table.get(index - 62) {
                Some(entry) => Ok(Lookup::Dynamic(entry)),
                None if self.complete => Err(Malformed("index beyond the dynamic table")),
                None => Ok(Lookup::Unknown),
            },
        }
    }

    fn insert(&mut self, entry: Entry) {
        self.table_bytes += entry.size();
        self.table.push_front(entry);
        self.evict();
    }

    /// A dynamic table size update (RFC 7541 section 6.3).
    fn resize(&mut self, size: usize) {
        self.max_size = size;
        self.evict();
    }

    fn evict(&mut self) {
        let limit = self.max_size.min(MAX_TRACKED_TABLE_BYTES);
        while self.table_bytes > limit {
            let Some(old) = self.table.pop_back() else { break };
            self.table_bytes -= old.size();
            // Beyond the sender's own size this is the sender's eviction; beyond sonde's cap it
            // is ours, and references to the entry become undecodable.
            if self.max_size > MAX_TRACKED_TABLE_BYTES {
                self.complete = false;
            }
        }
    }

    /// A string literal (RFC 7541 section 5.2), Huffman-decoded when flagged.
    fn string(&mut self, block: &mut &[u8]) -> Result<Vec<u8>, Malformed> {
        let huffman = block.first().is_some_and(|b| b & 0x80 != 0);
        let len = integer(block, 7)? as usize;
        if block.len() < len {
            return Err(Malformed("string longer than its block"));
        }
        let (raw, rest) = block.split_at(len);
        *block = rest;
        if !huffman {
            return Ok(raw.to_vec());
        }
        self.huffman_buf.clear();
        httlib_huffman::decode(raw, &mut self.huffman_buf, httlib_huffman::DecoderSpeed::FourBits)
            .map_err(|_| Malformed("bad Huffman string"))?;
        Ok(std::mem::take(&mut self.huffman_buf))
    }
}

enum Lookup<'a> {
    Static(&'static str, &'static str),
    Dynamic(&'a Entry),
    Unknown,
}

/// An integer with an N-bit prefix (RFC 7541 section 5.1).
fn integer(block: &mut &[u8], prefix_bits: u8) -> Result<u64, Malformed> {
    let (&first, mut rest) = block.split_first().ok_or(Malformed("block ends in an integer"))?;
    let max_prefix = (1u64 << prefix_bits) - 1;
    let mut value = u64::from(first) & max_prefix;
    if value == max_prefix {
        let mut shift = 0;
        loop {
            let (&b, tail) = rest.split_first().ok_or(Malformed("block ends in an integer"))?;
            rest = tail;
            value += u64::from(b & 0x7f) << shift;
            shift += 7;
            if value > MAX_INTEGER {
                return Err(Malformed("integer too large"));
            }
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    *block = rest;
    Ok(value)
}

#[cfg(test)]
#[path = "hpack_tests.rs"]
mod tests;
