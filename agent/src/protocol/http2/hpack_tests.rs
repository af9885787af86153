use proptest::prelude::*;

use super::*;

fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits.chunks(2).map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap()).collect()
}

fn decode(d: &mut Decoder, hex: &str) -> (Vec<(String, String)>, BlockOutcome) {
    let mut fields = Vec::new();
    let outcome = d
        .decode(&unhex(hex), |n, v| {
            fields.push((String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()))
        })
        .expect("valid block");
    (fields, outcome)
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect()
}

const C4_1: &str = "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff";
const C4_2: &str = "8286 84be 5886 a8eb 1064 9cbf";
const C4_3: &str = "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf";

/// RFC 7541 C.3: requests without Huffman coding, one decoder.
#[test]
fn rfc7541_c3_requests_without_huffman() {
    let mut d = Decoder::from_start();
    let (f, _) = decode(&mut d, "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d");
    assert_eq!(f, pairs(&[(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]));
    assert_eq!(d.table_bytes, 57);
    let (f, _) = decode(&mut d, "8286 84be 5808 6e6f 2d63 6163 6865");
    assert_eq!(f[3], (":authority".into(), "www.example.com".into()));
    assert_eq!(f[4], ("cache-control".into(), "no-cache".into()));
    assert_eq!(d.table_bytes, 110);
    let (f, _) = decode(&mut d, "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65");
    assert_eq!(
        f,
        pairs(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ])
    );
    assert_eq!(d.table_bytes, 164);
}

/// RFC 7541 C.4: the same requests Huffman-coded.
#[test]
fn rfc7541_c4_requests_with_huffman() {
    let mut d = Decoder::from_start();
    let (f, _) = decode(&mut d, C4_1);
    assert_eq!(f, pairs(&[(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]));
    let (f, _) = decode(&mut d, C4_2);
    assert_eq!(f[4], ("cache-control".into(), "no-cache".into()));
    let (f, outcome) = decode(&mut d, C4_3);
    assert_eq!(f[4], ("custom-key".into(), "custom-value".into()));
    assert_eq!(f[3], (":authority".into(), "www.example.com".into()));
    assert_eq!((outcome.undecodable, d.table_bytes, d.complete()), (0, 164, true));
}

/// RFC 7541 C.6: Huffman-coded responses with a 256-byte table, so entries are evicted.
#[test]
fn rfc7541_c6_responses_with_eviction() {
    let mut d = Decoder { max_size: 256, ..Decoder::from_start() };
    let (f, _) = decode(
        &mut d,
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 \
         2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
    );
    assert_eq!(
        f,
        pairs(&[
            (":status", "302"),
            ("cache-control", "private"),
            ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
            ("location", "https://www.example.com"),
        ])
    );
    assert_eq!(d.table_bytes, 222);
    let (f, _) = decode(&mut d, "4883 640e ffc1 c0bf");
    assert_eq!(f[0], (":status".into(), "307".into()));
    assert_eq!(f[3], ("location".into(), "https://www.example.com".into()));
    assert_eq!((d.table_bytes, d.table.len()), (222, 4));
    let (f, _) = decode(
        &mut d,
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab \
         77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f \
         9587 3160 65c0 03ed 4ee5 b106 3d50 07",
    );
    assert_eq!(
        f,
        pairs(&[
            (":status", "200"),
            ("cache-control", "private"),
            ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
            ("location", "https://www.example.com"),
            ("content-encoding", "gzip"),
            ("set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
        ])
    );
    assert_eq!((d.table_bytes, d.table.len()), (215, 3));
}

/// Seen from C.4.2 on: the entry C.4.1 inserted is unknown, so `:authority` is reported as
/// undecodable, while what C.4.2 inserts is known from then on.
#[test]
fn mid_stream_references_to_unseen_entries_are_undecodable() {
    let mut d = Decoder::mid_stream();
    let (f, outcome) = decode(&mut d, C4_2);
    assert_eq!(f, pairs(&[(":method", "GET"), (":scheme", "http"), (":path", "/"), ("cache-control", "no-cache")]));
    assert_eq!(outcome.undecodable, 1);
    let (f, outcome) = decode(&mut d, C4_3);
    assert_eq!(
        f,
        pairs(&[(":method", "GET"), (":scheme", "https"), (":path", "/index.html"), ("custom-key", "custom-value")])
    );
    assert_eq!(outcome.undecodable, 1, ":authority is still the unseen entry");
    // Indexed 62 and 63: the two entries seen inserted, newest first.
    let (f, outcome) = decode(&mut d, "bebf");
    assert_eq!(f, pairs(&[("custom-key", "custom-value"), ("cache-control", "no-cache")]));
    assert_eq!(outcome.undecodable, 0);
    assert!(!d.complete());
}

/// A block that was not seen whole moves every entry by an unknown amount.
#[test]
fn a_lost_block_makes_known_entries_undecodable() {
    let mut d = Decoder::from_start();
    decode(&mut d, C4_1);
    d.lose_sync();
    let (f, outcome) = decode(&mut d, C4_2);
    assert_eq!(f.len(), 4);
    assert_eq!(outcome.undecodable, 1);
}

#[test]
fn malformed_blocks_are_errors_and_lose_the_table() {
    for bad in ["80", "ff", "bf", "4188 25a8", "0085 f2b2 4a87 ff"] {
        let mut d = Decoder::from_start();
        assert!(d.decode(&unhex(bad), |_, _| {}).is_err(), "{bad}");
        assert!(!d.complete());
    }
}

#[test]
fn table_size_updates_evict() {
    let mut d = Decoder::from_start();
    decode(&mut d, C4_1);
    assert_eq!(d.table.len(), 1);
    // A size update to 0 empties the table; 62 is then beyond it.
    let (_, outcome) = decode(&mut d, "20");
    assert_eq!((outcome.undecodable, d.table.len(), d.table_bytes), (0, 0, 0));
    assert!(d.decode(&unhex("be"), |_, _| {}).is_err());
}

#[test]
fn announced_sizes_beyond_the_cap_bound_memory() {
    let mut d = Decoder::from_start();
    // Size update to 1 MiB (5-bit prefix integer 1048576), then 100 entries of 1 KiB each.
    let mut block = vec![0x3f];
    let mut rest = (1u64 << 20) - 31;
    while rest >= 128 {
        block.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    block.push(rest as u8);
    for i in 0..100u8 {
        block.extend([0x40, 0x01, b'k', 0x7f]);
        block.extend([0x81, 0x07]); // 1024 = 127 + 897; 897 = 0x81 | 7 << 7
        block.extend(std::iter::repeat_n(b'a' + i % 26, 1024));
    }
    let mut n = 0;
    d.decode(&block, |_, _| n += 1).unwrap();
    assert_eq!(n, 100);
    assert!(d.table_bytes <= MAX_TRACKED_TABLE_BYTES);
    assert!(!d.complete(), "entries the sender keeps were dropped: references to them are undecodable");
}

fn header_list() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    let name = prop::sample::select(vec![":method", ":path", "content-type", "x-id", "grpc-status", "user-agent"]);
    let value = prop::sample::select(vec!["GET", "/a", "/b/c", "application/grpc", "0", "7", "curl/8"]);
    prop::collection::vec((name, value).prop_map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())), 1..8)
}

proptest! {
    /// Against an independent encoder: a decoder from the start decodes every block exactly;
    /// one that starts at any later block never reports a field that was not sent, in order.
    #[test]
    fn decodes_an_independent_encoders_blocks_and_never_guesses(
        lists in prop::collection::vec(header_list(), 1..12),
        start in 0usize..12,
    ) {
        let mut encoder = loona_hpack::Encoder::new();
        let blocks: Vec<Vec<u8>> = lists
            .iter()
            .map(|l| encoder.encode(l.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))))
            .collect();
        let mut full = Decoder::from_start();
        let mut late = Decoder::mid_stream();
        for (i, (block, sent)) in blocks.iter().zip(&lists).enumerate() {
            let mut got = Vec::new();
            full.decode(block, |n, v| got.push((n.to_vec(), v.to_vec()))).unwrap();
            prop_assert_eq!(&got, sent);
            if i >= start {
                let mut partial = Vec::new();
                let outcome = late.decode(block, |n, v| partial.push((n.to_vec(), v.to_vec()))).unwrap();
                prop_assert_eq!(partial.len() + outcome.undecodable as usize, sent.len());
                let mut rest = sent.iter();
                for f in &partial {
                    prop_assert!(rest.any(|s| s == f), "{:?} was not sent in this order", f);
                }
            }
        }
    }
}
