//! How the compiler's POLICY entries (LPM-style port prefixes, `PolicyEntryKey`) become the
//! POLICY hash the programs read: one group per (endpoint, peer identity, direction, protocol),
//! each entry one inclusive [`PortRange`], in chunks of [`PORT_RANGES_PER_CHUNK`].
//!
//! Ranges are never merged, so the map can be read back into exactly the entries that produced
//! it (a restarted agent diffs against that).

use policy_common::{
    Direction, POLICY_FIXED_PREFIX_BITS, POLICY_FULL_PREFIX_BITS, POLICY_MAX_CHUNKS,
    PORT_RANGES_PER_CHUNK, PolicyGroupKey, PolicyKey, PolicyValue, PortRange, PortRanges,
};

use crate::compiler::output::PolicyEntryKey;

/// The group (chunk 0) an entry belongs to.
pub(crate) fn group_of(key: &PolicyEntryKey) -> PolicyGroupKey {
    PolicyGroupKey {
        endpoint: u32::from_be_bytes(key.key.endpoint),
        identity: u32::from_be_bytes(key.key.identity),
        direction: key.key.direction,
        protocol: key.key.protocol,
        chunk: 0,
        _pad: 0,
    }
}

/// The ports an entry covers. Prefix lengths outside 80..=96 are clamped (the compiler never
/// emits them).
pub(crate) fn range_of(key: &PolicyEntryKey, value: &PolicyValue) -> PortRange {
    let bits = key
        .prefix_len
        .clamp(POLICY_FIXED_PREFIX_BITS, POLICY_FULL_PREFIX_BITS)
        - POLICY_FIXED_PREFIX_BITS;
    let host_mask = (0xffff_u32 >> bits) as u16;
    let first = u16::from_be_bytes(key.key.dport) & !host_mask;
    PortRange {
        first,
        last: first | host_mask,
        rule: value.rule,
    }
}

/// The entry a stored range came from; `None` if the range is not an aligned power of two (not
/// written by [`range_of`]).
pub(crate) fn entry_of(
    group: &PolicyGroupKey,
    range: &PortRange,
) -> Option<(PolicyEntryKey, PolicyValue)> {
    let size = u32::from(range.last.checked_sub(range.first)?) + 1;
    if !size.is_power_of_two() || u32::from(range.first) % size != 0 {
        return None;
    }
    let direction = match group.direction {
        d if d == Direction::Ingress as u8 => Direction::Ingress,
        d if d == Direction::Egress as u8 => Direction::Egress,
        _ => return None,
    };
    let key = PolicyEntryKey {
        prefix_len: POLICY_FULL_PREFIX_BITS - size.trailing_zeros(),
        key: PolicyKey::new(
            group.endpoint,
            group.identity,
            direction,
            group.protocol,
            range.first,
        ),
    };
    Some((
        key,
        PolicyValue {
            rule: range.rule,
            flags: 0,
        },
    ))
}

/// The chunk values for a group's ranges (sorted), or `None` when they need more than
/// [`POLICY_MAX_CHUNKS`] chunks. Unused slots (only ever at the end of the last chunk) hold port
/// 65535 with rule 0, which the program reads as "no rule" (it checks every slot rather than
/// `count`, which keeps verification cheap).
pub(crate) fn chunks(ranges: &[PortRange]) -> Option<Vec<PortRanges>> {
    let pieces: Vec<&[PortRange]> = ranges.chunks(PORT_RANGES_PER_CHUNK).collect();
    if pieces.len() > usize::from(POLICY_MAX_CHUNKS) {
        return None;
    }
    let last = pieces.len().saturating_sub(1);
    Some(
        pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                let mut value = PortRanges {
                    count: piece.len() as u32,
                    more: u32::from(i < last),
                    ranges: [EMPTY_RANGE; PORT_RANGES_PER_CHUNK],
                };
                value.ranges[..piece.len()].copy_from_slice(piece);
                value
            })
            .collect(),
    )
}

/// An unused slot: matching it means "no rule" (rule references start at 1).
const EMPTY_RANGE: PortRange = PortRange {
    first: u16::MAX,
    last: u16::MAX,
    rule: 0,
};

/// A group's key for chunk `chunk`.
pub(crate) fn chunk_key(group: &PolicyGroupKey, chunk: u8) -> PolicyGroupKey {
    PolicyGroupKey { chunk, ..*group }
}

pub(crate) fn describe_group(group: &PolicyGroupKey) -> String {
    format!(
        "endpoint {} identity {} direction {} protocol {}",
        group.endpoint, group.identity, group.direction, group.protocol
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(port: u16, prefix_len: u32) -> PolicyEntryKey {
        PolicyEntryKey {
            prefix_len,
            key: PolicyKey::new(7, 300, Direction::Egress, 6, port),
        }
    }

    #[test]
    fn entries_round_trip_through_ranges() {
        let value = PolicyValue { rule: 9, flags: 0 };
        for (port, len, first, last) in [
            (80, 96, 80, 80),
            (8000, 90, 8000, 8063),
            (0, 80, 0, 65535),
            (32768, 81, 32768, 65535),
        ] {
            let key = entry(port, len);
            let range = range_of(&key, &value);
            assert_eq!((range.first, range.last, range.rule), (first, last, 9));
            assert_eq!(entry_of(&group_of(&key), &range), Some((key, value)));
        }
        // Host bits in the compiler's port are masked off like the kernel LPM did.
        assert_eq!(range_of(&entry(8005, 90), &value).first, 8000);
    }

    #[test]
    fn unaligned_ranges_are_not_entries() {
        let group = group_of(&entry(1, 96));
        let range = PortRange {
            first: 10,
            last: 20,
            rule: 1,
        };
        assert_eq!(entry_of(&group, &range), None);
    }

    #[test]
    fn chunks_link_with_more_and_have_a_bound() {
        let ranges: Vec<PortRange> = (0..40)
            .map(|p| PortRange {
                first: p,
                last: p,
                rule: 1,
            })
            .collect();
        let c = chunks(&ranges).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!((c[0].count, c[0].more), (15, 1));
        assert_eq!((c[2].count, c[2].more), (10, 0));
        assert_eq!(c[2].ranges[9].first, 39);
        assert!(chunks(&[]).unwrap().is_empty());
        let too_many = vec![ranges[0]; PORT_RANGES_PER_CHUNK * usize::from(POLICY_MAX_CHUNKS) + 1];
        assert!(chunks(&too_many).is_none());
    }
}
