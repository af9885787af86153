//! One writer's bytes (a thread writing to one fd) into log records: one per line; a line that
//! continues the record before it (indented, a stack trace's frames and its closing exception
//! line, `Caused by:`) joins it; a partial line waits for its end. A record is complete when the
//! writer starts another one, or when it has waited `wait_ns` for more.

/// Longest record kept; a longer one is cut there (and the rest starts a new record).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// A finished record: its text, when its first byte was written, and the trace link its writer
/// had then.
#[derive(Clone, Debug, PartialEq)]
pub struct Assembled<L> {
    pub body: String,
    pub ts_ns: u64,
    pub link: L,
    /// The write it started in (within its writer).
    pub first_write: u64,
}

/// A record that starts in a write carrying other records too: the writing thread may have
/// flushed lines other threads buffered (a shared, line-buffered stream), so the link of that
/// write is no evidence for it.
pub trait Unproven {
    fn unproven(&self) -> Self;
}

struct Building<L> {
    body: String,
    ts_ns: u64,
    link: L,
    /// Kernel time of the latest line added.
    last_ns: u64,
    /// Inside a Python traceback: after its frames, the exception line still belongs to it.
    in_traceback: bool,
    previous_indented: bool,
    /// Blank lines seen after the record: kept only if a continuation follows.
    blank_lines: usize,
    /// The write its latest line came in, and its first.
    last_write: u64,
    first_write: u64,
    /// Its latest line announced a chained exception: the next traceback belongs to it.
    chained: bool,
}

pub struct Writer<L> {
    partial: Vec<u8>,
    partial_ts_ns: u64,
    partial_link: Option<L>,
    /// The write the partial line's first byte came in.
    partial_write: u64,
    record: Option<Building<L>>,
    /// Writes seen, numbering them.
    writes: u64,
    /// Records started by the current write.
    started: usize,
}

impl<L> Default for Writer<L> {
    fn default() -> Self {
        Self {
            partial: Vec::new(),
            partial_ts_ns: 0,
            partial_link: None,
            partial_write: 0,
            record: None,
            writes: 0,
            started: 0,
        }
    }
}

/// A Python traceback's first line. It continues the record before it when both came in one
/// write (`logging.exception`), or after a chaining line; written on its own
/// (`traceback.print_exc`) it starts a record.
const TRACEBACK: &str = "Traceback (most recent call last):";
/// Lines that always continue the record before them.
const CONTINUATION_STARTS: [&str; 3] =
    ["Caused by:", "During handling of the above exception", "The above exception was the direct cause"];

impl<L: Clone + Unproven> Writer<L> {
    /// One write's bytes at kernel time `ts_ns`; `link` is the writer's trace link at that
    /// moment. `truncated`: the write was longer than what was captured, so its last line ends
    /// here (its rest is lost).
    pub fn write(&mut self, bytes: &[u8], ts_ns: u64, truncated: bool, link: &L, out: &mut Vec<Assembled<L>>) {
        self.writes += 1;
        self.started = 0;
        let first_out = out.len();
        let mut rest = bytes;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            let (line, ts, line_link, first_write) = self.take_line(&rest[..nl], ts_ns, link);
            self.line(&line, ts, line_link, first_write, out);
            rest = &rest[nl + 1..];
        }
        if !rest.is_empty() {
            if self.partial.is_empty() {
                self.partial_ts_ns = ts_ns;
                self.partial_link = Some(link.clone());
                self.partial_write = self.writes;
            }
            let room = MAX_RECORD_BYTES.saturating_sub(self.partial.len());
            self.partial.extend_from_slice(&rest[..rest.len().min(room)]);
        }
        if truncated || self.partial.len() >= MAX_RECORD_BYTES {
            self.flush_partial(out);
        }
        if self.started > 1 {
            let this_write = self.writes;
            for a in &mut out[first_out..] {
                if a.first_write == this_write {
                    a.link = a.link.unproven();
                }
            }
            if let Some(r) = &mut self.record
                && r.first_write == this_write
            {
                r.link = r.link.unproven();
            }
        }
    }

    /// Completes what has waited `wait_ns` since its last byte (kernel time `now_ns`). True
    /// when nothing is left.
    pub fn flush_due(&mut self, now_ns: u64, wait_ns: u64, out: &mut Vec<Assembled<L>>) -> bool {
        if !self.partial.is_empty() && now_ns.saturating_sub(self.partial_ts_ns) >= wait_ns {
            self.flush_partial(out);
        }
        if self.partial.is_empty()
            && let Some(r) = &self.record
            && now_ns.saturating_sub(r.last_ns) >= wait_ns
        {
            self.finish_record(out);
        }
        self.partial.is_empty() && self.record.is_none()
    }

    /// The fd closed or the process ended: everything is complete.
    pub fn finish(&mut self, out: &mut Vec<Assembled<L>>) {
        self.flush_partial(out);
        self.finish_record(out);
    }

    fn flush_partial(&mut self, out: &mut Vec<Assembled<L>>) {
        if self.partial.is_empty() {
            return;
        }
        let Some(link) = self.partial_link.take() else { return };
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        self.line(&line, self.partial_ts_ns, link, self.partial_write, out);
    }

    /// The text of a line ending here, joined to the partial line before it; the time and
    /// link are those of its first byte.
    fn take_line(&mut self, tail: &[u8], ts_ns: u64, link: &L) -> (String, u64, L, u64) {
        if self.partial.is_empty() {
            return (String::from_utf8_lossy(tail).into_owned(), ts_ns, link.clone(), self.writes);
        }
        let room = MAX_RECORD_BYTES.saturating_sub(self.partial.len());
        self.partial.extend_from_slice(&tail[..tail.len().min(room)]);
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        let first_link = self.partial_link.take().unwrap_or_else(|| link.clone());
        (line, self.partial_ts_ns, first_link, self.partial_write)
    }

    fn line(&mut self, line: &str, ts_ns: u64, link: L, first_write: u64, out: &mut Vec<Assembled<L>>) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            if let Some(r) = &mut self.record {
                r.blank_lines += 1;
            }
            return;
        }
        let indented = line.starts_with([' ', '\t']);
        if let Some(r) = &mut self.record
            && r.body.len() + line.len() < MAX_RECORD_BYTES
        {
            let chaining = CONTINUATION_STARTS.iter().any(|p| line.starts_with(p));
            let traceback = line.starts_with(TRACEBACK) && (r.last_write == self.writes || r.chained);
            let exception_line = r.in_traceback && r.previous_indented && !indented;
            if indented || chaining || traceback || exception_line {
                for _ in 0..r.blank_lines {
                    r.body.push('\n');
                }
                r.blank_lines = 0;
                r.body.push('\n');
                r.body.push_str(line);
                r.last_ns = ts_ns;
                r.last_write = self.writes;
                r.chained = chaining;
                if traceback {
                    r.in_traceback = true;
                } else if exception_line {
                    r.in_traceback = false;
                }
                r.previous_indented = indented;
                return;
            }
        }
        self.finish_record(out);
        self.record = Some(Building {
            body: line.to_string(),
            ts_ns,
            link,
            last_ns: ts_ns,
            in_traceback: line.starts_with(TRACEBACK),
            previous_indented: indented,
            blank_lines: 0,
            last_write: self.writes,
            first_write,
            chained: false,
        });
        if first_write == self.writes {
            self.started += 1;
        }
    }

    fn finish_record(&mut self, out: &mut Vec<Assembled<L>>) {
        if let Some(r) = self.record.take() {
            out.push(Assembled { body: r.body, ts_ns: r.ts_ns, link: r.link, first_write: r.first_write });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Unproven for usize {
        fn unproven(&self) -> Self {
            usize::MAX
        }
    }

    fn feed(writes: &[&str]) -> Vec<String> {
        let mut w = Writer::default();
        let mut out = Vec::new();
        for (i, chunk) in writes.iter().enumerate() {
            w.write(chunk.as_bytes(), i as u64, false, &i, &mut out);
        }
        w.finish(&mut out);
        out.into_iter().map(|a| a.body).collect()
    }

    #[test]
    fn one_record_per_line_and_partial_lines_wait() {
        assert_eq!(feed(&["a\nb\n", "c", "d\n"]), vec!["a", "b", "cd"]);
        assert_eq!(feed(&["x\r\n\n\ny\n"]), vec!["x", "y"]);
        let mut w = Writer::default();
        let mut out = Vec::new();
        w.write(b"first ", 10, false, &1, &mut out);
        w.write(b"half\nsecond\n", 20, false, &2, &mut out);
        w.finish(&mut out);
        assert_eq!((out[0].body.as_str(), out[0].ts_ns, out[0].link), ("first half", 10, 1));
        assert_eq!((out[1].body.as_str(), out[1].ts_ns, out[1].link), ("second", 20, 2));
        // Two records started in one write: neither has its writer's link as evidence.
        let mut out = Vec::new();
        w.write(b"a\nb\n", 30, false, &3, &mut out);
        w.write(b"c\n  continued\n", 40, false, &4, &mut out);
        w.finish(&mut out);
        let links: Vec<(String, usize)> = out.into_iter().map(|a| (a.body, a.link)).collect();
        assert_eq!(links, [("a".into(), usize::MAX), ("b".into(), usize::MAX), ("c\n  continued".into(), 4)]);
    }

    #[test]
    fn a_python_traceback_is_one_record_written_at_once_or_line_by_line() {
        let tb = "ERROR:root:request failed\nTraceback (most recent call last):\n  File \"app.py\", line 3, in handle\n    boom()\nValueError: bad value\n";
        let expected = tb.trim_end().to_string();
        assert_eq!(feed(&[tb, "INFO next\n"]), vec![expected.clone(), "INFO next".into()]);
        // Printed line by line after a line of its own (`traceback.print_exc`): the traceback
        // is its own record.
        let by_line: Vec<&str> = tb.split_inclusive('\n').collect();
        let (first, rest) = expected.split_once('\n').unwrap();
        assert_eq!(feed(&by_line), vec![first.to_string(), rest.to_string()]);
        // A bare traceback (the default excepthook), chained.
        let chained = "Traceback (most recent call last):\n  File \"a\", line 1\nKeyError: 'k'\n\nDuring handling of the above exception, another exception occurred:\n\nTraceback (most recent call last):\n  File \"b\", line 2\nRuntimeError: x\nafter\n";
        let out = feed(&[chained]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].ends_with("RuntimeError: x") && out[0].contains("\n\nDuring handling"), "{}", out[0]);
        assert_eq!(out[1], "after");
    }

    #[test]
    fn java_frames_join_and_json_lines_stay_apart() {
        let java = "Exception in thread \"main\" java.lang.IllegalStateException: x\n\tat A.b(A.java:1)\nCaused by: java.io.IOException\n\t... 3 more\n";
        assert_eq!(feed(&[java]).len(), 1);
        assert_eq!(feed(&["{\"a\":1}\n{\"a\":2}\n"]), vec!["{\"a\":1}", "{\"a\":2}"]);
    }

    #[test]
    fn waiting_is_bounded_and_truncated_writes_end_their_line() {
        let mut w = Writer::default();
        let mut out = Vec::new();
        w.write(b"no newline", 100, false, &0, &mut out);
        assert!(!w.flush_due(150, 100, &mut out));
        assert!(out.is_empty());
        // At its deadline the partial line is a record, which has waited as long since its
        // last byte: it is complete.
        assert!(w.flush_due(200, 100, &mut out));
        assert_eq!(out.len(), 1);
        w.write(b"cut he", 400, true, &0, &mut out);
        w.write(b"next\n", 401, false, &0, &mut out);
        w.finish(&mut out);
        assert_eq!(out.iter().map(|a| a.body.as_str()).collect::<Vec<_>>(), ["no newline", "cut he", "next"]);
    }
}
