//! Map definitions adjusted before loading. A sock hash can only be created with CAP_NET_ADMIN,
//! which sonde needs only for traceparent injection: without injection the object's sock hash is
//! created as a plain hash of the same shape, which nothing uses (its programs are not loaded).

use std::borrow::Cow;

use object::{Object, ObjectSection, ObjectSymbol};

/// `bpf_map_type` numbers (include/uapi/linux/bpf.h).
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;

/// The object with the sock hash `name` turned into a plain hash (aya-ebpf's legacy map
/// definition starts with the map type, a u32). Unchanged when there is no such map.
pub fn without_sock_hash<'a>(elf: &'a [u8], name: &str) -> Result<Cow<'a, [u8]>, String> {
    let file = object::File::parse(elf).map_err(|e| format!("parsing the eBPF object: {e}"))?;
    let Some(symbol) = file.symbols().find(|s| s.name() == Ok(name)) else { return Ok(Cow::Borrowed(elf)) };
    let section = symbol
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .ok_or_else(|| format!("map {name} has no section"))?;
    let (section_offset, _) = section.file_range().ok_or_else(|| format!("map {name}'s section has no data"))?;
    let at = (section_offset + symbol.address() - section.address()) as usize;
    let current = elf
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| format!("map {name} lies outside the object"))?;
    if current != BPF_MAP_TYPE_SOCKHASH {
        return Err(format!("map {name} has type {current}, not a sock hash"));
    }
    let mut patched = elf.to_vec();
    patched[at..at + 4].copy_from_slice(&BPF_MAP_TYPE_HASH.to_le_bytes());
    Ok(Cow::Owned(patched))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_object_s_sock_hash_becomes_a_hash() {
        let elf = super::super::loader::probes_object();
        if elf.is_empty() {
            return; // built with AYA_BUILD_SKIP: no object to check
        }
        let patched = without_sock_hash(elf, "INJECT_SOCKS").unwrap();
        assert_ne!(&patched[..], elf);
        assert_eq!(patched.len(), elf.len());
        let again = without_sock_hash(&patched, "INJECT_SOCKS").unwrap_err();
        assert!(again.contains("type 1"), "{again}");
        assert!(matches!(without_sock_hash(elf, "NO_SUCH_MAP").unwrap(), Cow::Borrowed(_)));
    }
}
