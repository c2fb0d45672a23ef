//! How the compiler's POLICY entries (port ranges, `PolicyEntryKey`) become the POLICY hash the
//! programs read: one group per (endpoint, peer identity, direction, protocol), each entry one
//! inclusive [`PortRange`], in chunks of [`PORT_RANGES_PER_CHUNK`].
//!
//! The compiler merges a group's ranges; the writer stores them as they are, so the map reads
//! back into exactly the entries that produced it (a restarted agent diffs against that).

use policy_common::{
    Direction, POLICY_MAX_CHUNKS, PORT_RANGES_PER_CHUNK, PolicyGroupKey, PolicyValue, PortRange,
    PortRanges,
};

use crate::compiler::output::PolicyEntryKey;

/// The group (chunk 0) an entry belongs to.
pub(crate) fn group_of(key: &PolicyEntryKey) -> PolicyGroupKey {
    PolicyGroupKey {
        endpoint: key.endpoint,
        identity: key.identity,
        direction: key.direction as u8,
        protocol: key.protocol,
        chunk: 0,
        _pad: 0,
    }
}

/// The stored range of an entry.
pub(crate) fn range_of(key: &PolicyEntryKey, value: &PolicyValue) -> PortRange {
    PortRange {
        first: key.first,
        last: key.last,
        rule: value.rule,
    }
}

/// The entry a stored range came from; `None` for a range no writer stores (empty, or with a
/// direction that does not exist).
pub(crate) fn entry_of(
    group: &PolicyGroupKey,
    range: &PortRange,
) -> Option<(PolicyEntryKey, PolicyValue)> {
    if range.first > range.last || range.rule == 0 {
        return None;
    }
    let direction = match group.direction {
        d if d == Direction::Ingress as u8 => Direction::Ingress,
        d if d == Direction::Egress as u8 => Direction::Egress,
        _ => return None,
    };
    let key = PolicyEntryKey {
        endpoint: group.endpoint,
        identity: group.identity,
        direction,
        protocol: group.protocol,
        first: range.first,
        last: range.last,
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

    fn entry(first: u16, last: u16) -> PolicyEntryKey {
        PolicyEntryKey {
            endpoint: 7,
            identity: 300,
            direction: Direction::Egress,
            protocol: 6,
            first,
            last,
        }
    }

    #[test]
    fn entries_round_trip_through_ranges() {
        let value = PolicyValue { rule: 9, flags: 0 };
        for (first, last) in [(80, 80), (8000, 8063), (0, 65535), (1, 65535), (10, 20)] {
            let key = entry(first, last);
            let range = range_of(&key, &value);
            assert_eq!((range.first, range.last, range.rule), (first, last, 9));
            assert_eq!(entry_of(&group_of(&key), &range), Some((key, value)));
        }
    }

    #[test]
    fn empty_slots_and_reversed_ranges_are_not_entries() {
        let group = group_of(&entry(1, 1));
        assert_eq!(entry_of(&group, &EMPTY_RANGE), None);
        let reversed = PortRange {
            first: 20,
            last: 10,
            rule: 1,
        };
        assert_eq!(entry_of(&group, &reversed), None);
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
        let too_many = vec![ranges[0]; policy_common::POLICY_MAX_RANGES + 1];
        assert!(chunks(&too_many).is_none());
    }
}
